#!/bin/sh
# Builds dist/tollgate_<version>_amd64.deb from this checkout, on the Debian
# release it is for: the venv inside is tied to the build host's python3 minor.
#
#   TOLLGATE_VERSION   package version (default: pyproject.toml's)
#   TOLLGATE_DEB_DIR   output directory (default: dist/)
#   TOLLGATE_REFRESH_CONSTRAINTS=1  re-pin packaging/constraints.txt from
#                      what pip resolves now (otherwise the pins are used)
#
# Python dependencies Debian does not ship go into /opt/tollgate/venv, a venv
# made with --system-site-packages from /usr/bin/python3 so that Debian's
# bcc and nftables bindings are seen; everything else is installed into the
# venv itself (--ignore-installed), so the package does not depend on which
# python3-* packages the build host happened to have.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=/usr/bin/python3
VENV=/opt/tollgate/venv
VERSION=${TOLLGATE_VERSION:-$($PY -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}
OUT=${TOLLGATE_DEB_DIR:-$ROOT/dist}
CONSTRAINTS=$ROOT/packaging/constraints.txt
PYMINOR=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')

WORK=$(mktemp -d /tmp/tollgate-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT INT TERM
PKG=$WORK/pkg
STAGE=$PKG$VENV
SITE=$STAGE/lib/python$PYMINOR/site-packages

log() { echo "build-deb: $*" >&2; }

# A copy of the source: building in the checkout would leave build/ and
# *.egg-info behind in a tree others work in.
copy_source() {
    mkdir -p "$WORK/src/bpf"
    cp -r pyproject.toml setup.py agent "$WORK/src/"
    cp bpf/events.h "$WORK/src/bpf/"  # the native opener reads the witness's events as declared
    find "$WORK/src" -name __pycache__ -type d -prune -exec rm -rf {} +
    find "$WORK/src" -name '*.so' -delete  # the wheel compiles its own native part
}

make_venv() {
    $PY -m venv --system-site-packages "$STAGE"
    "$STAGE/bin/python" -m pip wheel -qq --no-deps --no-build-isolation -w "$WORK/wheel" "$WORK/src"
    pins=""
    [ -f "$CONSTRAINTS" ] && [ "${TOLLGATE_REFRESH_CONSTRAINTS:-}" != 1 ] && pins="-c $CONSTRAINTS"
    # shellcheck disable=SC2086
    "$STAGE/bin/python" -m pip install -qq --no-compile --ignore-installed $pins "$WORK"/wheel/*.whl
    "$STAGE/bin/python" -m pip freeze --local --exclude tollgate --exclude pip \
        --exclude setuptools > "$WORK/freeze.txt"
}

# A dependency added to pyproject.toml installs unpinned until re-pinned: say so.
check_pins() {
    if [ ! -f "$CONSTRAINTS" ] || [ "${TOLLGATE_REFRESH_CONSTRAINTS:-}" = 1 ]; then
        { echo "# Pins of the venv in the deb; refresh: TOLLGATE_REFRESH_CONSTRAINTS=1 make deb"
          cat "$WORK/freeze.txt"; } > "$CONSTRAINTS"
        log "pinned $(grep -vc '^#' "$CONSTRAINTS") packages in $CONSTRAINTS"
        return 0
    fi
    unpinned=$(cut -d= -f1 "$WORK/freeze.txt" | while read -r name; do
        grep -qi "^$name==" "$CONSTRAINTS" || printf ' %s' "$name"; done)
    [ -z "$unpinned" ] || log "NOT pinned:$unpinned (TOLLGATE_REFRESH_CONSTRAINTS=1 to pin)"
}

# The installed venv needs neither the installer nor its bytecode.
slim_venv() {
    "$STAGE/bin/python" -m pip uninstall -q -y pip setuptools
    find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
    rm -f "$STAGE"/bin/activate* "$STAGE"/bin/Activate.ps1
}

# agent/witness/loader.py finds bpf/ two levels above its package
# (site-packages/agent/witness -> site-packages/bpf): put it there.
add_bpf() {
    mkdir -p "$SITE/bpf"
    cp bpf/*.c bpf/*.h "$SITE/bpf/"
}

# A venv records its own path in its scripts; it was built at $STAGE but
# runs at $VENV.
relocate() {
    grep -rlF "$STAGE" "$STAGE" 2>/dev/null | while read -r f; do
        sed -i "s#$STAGE#$VENV#g" "$f"
    done
    # Wheels' shared objects carry symbols and debug info nobody here reads.
    find "$STAGE" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
    # Wheels mark plain modules executable; only scripts with a #! should be.
    find "$SITE" -type f -perm /111 ! -name '*.so*' | while read -r f; do
        head -c2 "$f" | grep -q '#!' || chmod a-x "$f"
    done
}

add_files() {
    mkdir -p "$PKG/usr/bin" "$PKG/etc/tollgate" "$PKG/lib/systemd/system" \
        "$PKG/usr/share/doc/tollgate" "$PKG/usr/share/lintian/overrides" "$PKG/DEBIAN"
    ln -s "$VENV/bin/tollgate" "$PKG/usr/bin/tollgate"
    $PY packaging/gen-config.py > "$PKG/etc/tollgate/tollgate.toml"
    chmod 0600 "$PKG/etc/tollgate/tollgate.toml"
    install -m 0644 packaging/tollgate.service packaging/tollgate-rules.service "$PKG/lib/systemd/system/"
    install -m 0644 packaging/debian/copyright packaging/OPERATOR.md "$PKG/usr/share/doc/tollgate/"
    install -m 0644 "$WORK/freeze.txt" "$PKG/usr/share/doc/tollgate/python-packages.txt"
    changelog | gzip -9n > "$PKG/usr/share/doc/tollgate/changelog.gz"
    install -m 0644 packaging/debian/lintian-overrides "$PKG/usr/share/lintian/overrides/tollgate"
}

# The changelog's top entry must name the version being built; a rebuild at
# another version (TOLLGATE_VERSION) gets an entry of its own on top.
changelog() {
    top=$(sed -n '1s/^tollgate (\([^)]*\)).*/\1/p' packaging/debian/changelog)
    if [ "$top" != "$VERSION" ]; then
        printf 'tollgate (%s) unstable; urgency=medium\n\n  * Rebuilt from the %s tree.\n\n -- %s  %s\n\n' \
            "$VERSION" "$top" "tollgate maintainers <tollgate@example.org>" "$(date -R)"
    fi
    cat packaging/debian/changelog
}

add_control() {
    for f in postinst prerm postrm; do
        install -m 0755 "packaging/debian/$f" "$PKG/DEBIAN/$f"
    done
    install -m 0644 packaging/debian/conffiles "$PKG/DEBIAN/conffiles"
    size=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
    # The venv's python is /usr/bin/python3 of this minor version, no other.
    next=$($PY -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
    sed -e "s/@VERSION@/$VERSION/" -e "s/@INSTALLED_SIZE@/$size/" \
        -e "s/@PYTHON_DEPENDS@/python3 (>= $PYMINOR), python3 (<< $next)/" \
        packaging/debian/control > "$PKG/DEBIAN/control"
    (cd "$PKG" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
        | xargs -0 md5sum > DEBIAN/md5sums)
    chmod 0644 "$PKG/DEBIAN/md5sums"
}

log "version $VERSION, python $PYMINOR"
copy_source
make_venv
check_pins
slim_venv
add_bpf
relocate
add_files
add_control
mkdir -p "$OUT"
deb="$OUT/tollgate_${VERSION}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$deb" >/dev/null
log "built $deb"
echo "$deb"
