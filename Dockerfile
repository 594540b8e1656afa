# The sknf node agent image: Debian's python3 and BCC, the sknf package in a venv that sees them, the
# CNI plugin (installed on the host by the agent itself, once it is ready), iproute2 and iptables, and
# what `sknf doctor` and `sknf sysdump` read with (nftables and its Python binding, bpftool, conntrack).
#
#   docker build -t registry.example.com/sknf:0.1.0 . && docker push registry.example.com/sknf:0.1.0
#
# Reproducible builds: pin the base by digest as well as tag, e.g.
#   FROM debian:bookworm-slim@sha256:<digest>   (docker buildx imagetools inspect debian:bookworm-slim)
FROM debian:bookworm-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/sknf/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Kernel headers are a fallback for hosts without their own (see scripts/container-entrypoint). They are
# unpacked from the .debs, not installed: linux-headers-* depend on gcc, which BCC does not need, and the
# .debs carry a real ./lib that must not replace the merged-/usr /lib symlink. Other architectures go.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc python3-nftables iproute2 iptables \
    nftables bpftool conntrack \
 && abi=$(apt-cache depends linux-headers-amd64 | sed -n 's/^ *Depends: linux-headers-\(.*\)-amd64$/\1/p') \
 && mkdir /tmp/headers && cd /tmp/headers \
 && apt-get download "linux-headers-$abi-amd64" "linux-headers-$abi-common" \
 && for deb in ./*.deb; do dpkg-deb -x "$deb" .; done \
 && mv usr/src/linux-headers-* /usr/src/ \
 && find /usr/src/linux-headers-*-common/arch -mindepth 1 -maxdepth 1 ! -name x86 -exec rm -rf {} + \
 && cd / && rm -rf /tmp/headers /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# Source layout kept as in the repository: the datapath compiles bpf/*.c at start, and the package
# reaches the plugin through the sknf/cni_plugin symlink to cni/sknf.
WORKDIR /opt/sknf/src
COPY pyproject.toml README.md ./
COPY sknf/ sknf/
COPY bpf/ bpf/
COPY cni/ cni/
RUN python3 -m venv --system-site-packages /opt/sknf/venv \
 && /opt/sknf/venv/bin/pip install --editable . \
 && /opt/sknf/venv/bin/python -c "import bcc, sknf.kube, sknf.install; sknf.install.plugin_source()"

COPY scripts/container-entrypoint /usr/local/bin/sknf-entrypoint
ENTRYPOINT ["/usr/local/bin/sknf-entrypoint"]
CMD ["agent", "--config", "/etc/sknf/config.yaml"]
