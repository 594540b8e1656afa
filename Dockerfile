# The sknf node agent image: Debian's python3 and BCC, the sknf package in a venv that sees them, the
# CNI plugin (installed on the host by the agent itself, once it is ready), iproute2 and iptables, and
# what `sknf doctor` and `sknf sysdump` read with (nftables and its Python binding, bpftool, conntrack).
#
#   docker build -t registry.example.com/sknf:0.1.0 . && docker push registry.example.com/sknf:0.1.0
#
# Reproducible builds: pin the base by digest as well as tag, e.g.
#   --build-arg BASE=debian:bookworm-slim@sha256:<digest>   (docker buildx imagetools inspect debian:bookworm-slim)
ARG BASE=debian:bookworm-slim

# The CNI plugin: a static binary (cni/sknf.c, musl), built in its own stage so that no compiler
# reaches the image; the agent installs it on the host, which then needs no libc or Python for it.
FROM ${BASE} AS plugin
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools make \
 && rm -rf /var/lib/apt/lists/*
COPY cni/ /src/cni/
RUN make -C /src/cni OUT=/src/cni_plugin

FROM ${BASE}

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
# holds the plugin binary as sknf/cni_plugin (where a checkout's `make -C cni` puts it).
# PIP_CERT: a CA bundle for pip alone, for a build behind a TLS-intercepting proxy; mount it for the build
# (podman build -v HOSTFILE:/run/build-ca.crt:ro --build-arg PIP_CERT=/run/build-ca.crt), never copy it in.
ARG PIP_CERT
WORKDIR /opt/sknf/src
COPY pyproject.toml README.md ./
COPY sknf/ sknf/
COPY bpf/ bpf/
COPY --from=plugin /src/cni_plugin sknf/cni_plugin
# Not needed at run time, so not kept: the Kubernetes client's asyncio twin (kubernetes/aio, 68 MB of the
# package's 126; sknf uses the synchronous client) and pip itself.
RUN python3 -m venv --system-site-packages /opt/sknf/venv \
 && /opt/sknf/venv/bin/pip install --editable . \
 && site=$(/opt/sknf/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && rm -rf "$site/kubernetes/aio" \
 && /opt/sknf/venv/bin/python -m pip uninstall -y -q pip \
 && /opt/sknf/venv/bin/python -c "import bcc, kubernetes, sknf.kube, sknf.install; sknf.install.plugin_source()"

COPY scripts/container-entrypoint /usr/local/bin/sknf-entrypoint
ENTRYPOINT ["/usr/local/bin/sknf-entrypoint"]
CMD ["agent", "--config", "/etc/sknf/config.yaml"]
