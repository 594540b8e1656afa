#!/usr/bin/env bash
# Prepare a fresh Debian machine (as root) to build, run and test sknf. Idempotent: rerun at will.
#  - Debian packages: BCC (the PyPI "bcc" is another project), kernel headers for BCC, iproute2,
#    iptables, and the tools the lab, tests and benchmarks drive (podman, containerd, debootstrap for
#    the image's base, reference CNI plugins, iperf3, sockperf, prometheus, busybox), and musl-tools,
#    gcc and make for the static CNI plugin (gcc's sanitizers for its tests).
#  - /lib/modules/$(uname -r)/{build,source} links to Debian's headers when the running kernel has none.
#  - .venv made from Debian's python3 with --system-site-packages (so it sees BCC), sknf installed into it.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root" >&2; exit 1; }

pkgs=(python3 python3-venv python3-bpfcc bpfcc-tools linux-headers-amd64 iproute2 iptables kmod
      iperf3 sockperf podman runc containernetworking-plugins busybox-static prometheus bpftool
      nftables python3-nftables conntrack musl-tools gcc make containerd debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# BCC compiles against /lib/modules/$(uname -r)/build. Keep any real headers; otherwise point at
# Debian's newest generic ones (enough for tc programs, which use only stable UAPI and helpers).
mod="/lib/modules/$(uname -r)"
if [ ! -e "$mod/build/include" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$arch_dir" ] && [ -n "$common_dir" ] || { echo "setup.sh: no kernel headers under /usr/src" >&2; exit 1; }
  mkdir -p "$mod"
  ln -sfn "$arch_dir" "$mod/build"
  ln -sfn "$common_dir" "$mod/source"
fi

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
make -s -C cni  # the static CNI plugin, into the package as sknf/cni_plugin
echo "setup.sh: ready (.venv/bin/sknf)"
