#!/bin/sh
# Prepares a fresh Debian 12 machine (as root) to run and test tollgate from
# this checkout. Idempotent: every step checks before it acts, so CI and the
# README's commands may call it on every run.
set -eu
cd "$(dirname "$0")/.."

APT_PKGS="python3 python3-venv python3-bpfcc python3-nftables nftables iproute2 \
 linux-headers-cloud-amd64 libcap2-bin util-linux procps curl socat haproxy \
 postgresql postgresql-client openssh-server openssh-client \
 mariadb-server mariadb-client redis-server redis-tools nginx tshark \
 systemd systemd-container lintian dpkg-dev ruby chromium dnsmasq bind9-dnsutils gcc openssl \
 python3-dev libssl-dev libisal-dev librust-blake3-dev bpftool"

missing=""
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "dev-setup: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    # tshark asks whether non-root users may capture; answer once, non-interactively.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -qq
    # Package scripts must not start daemons here: tests start their own servers.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# BCC compiles against kernel headers; this kernel ships none, so borrow
# Debian's cloud headers (see DESIGN.md, "The kernel CI and tests run on").
K=$(uname -r)
if [ ! -e "/lib/modules/$K/build" ]; then
    H=$(ls -d /usr/src/linux-headers-*-cloud-amd64 | sort -V | tail -n1)
    mkdir -p "/lib/modules/$K"
    ln -sfn "$H" "/lib/modules/$K/build"
    ln -sfn "${H%-cloud-amd64}-common" "/lib/modules/$K/source"
fi
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true

# The venv sees Debian's bcc and nftables bindings; everything else from PyPI.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc, nftables' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.tollgate-installed
# The install also compiles the native data plane (agent/native): again when its C changed.
native_changed=$(find agent/native setup.py -newer "$stamp" \( -name '*.[ch]' -o -name setup.py \) \
    2>/dev/null | head -n1)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ -n "$native_changed" ] \
   || ! ls agent/native/_native.*.so >/dev/null 2>&1; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
