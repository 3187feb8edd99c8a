#!/usr/bin/env bash
# Runs pinproxy's whole test suite on a fresh Debian machine: installs the
# real third-party peers the tests use when they are missing (tinyproxy,
# redis-server, microsocks, Dante, Chromium, Firefox ESR, NSS tools, curl,
# Python requests, Node.js, Go), then checks formatting and lints and runs
# every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# The build's own tools (cmake, clang, ... for BoringSSL) first.
scripts/build-deps.sh

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need tinyproxy tinyproxy
need redis-server redis-server
need microsocks microsocks
need danted dante-server
need certutil libnss3-tools
need chromium chromium
need firefox-esr firefox-esr
need curl curl
need python3 python3
need node nodejs
need go golang-go
# The system OpenSSL, which mirror mode opens at run time to say OpenSSL
# clients' hellos (its tests fail without it).
have_libssl3=no
for lib in /lib/*/libssl.so.3 /usr/lib/*/libssl.so.3 /usr/lib64/libssl.so.3; do
    [ -e "$lib" ] && have_libssl3=yes
done
[ "$have_libssl3" = yes ] || missing+=(libssl3)
# Python requests from Debian's package, for Debian's interpreter: some tests
# run /usr/bin/python3, whatever python3 comes first on PATH (a pyenv one may
# have requests of its own, which says nothing about Debian's).
/usr/bin/python3 -c 'import requests' 2>/dev/null || missing+=(python3-requests)

if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing test dependencies: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Some tests run the first python3 on PATH as well (a pyenv build links an
# OpenSSL of its own, another client to be seen through pinproxy): it needs
# requests too, from PyPI when it is not Debian's.
if ! python3 -c 'import requests' 2>/dev/null; then
    echo "installing Python requests for $(command -v python3)"
    python3 -m pip install --quiet --disable-pip-version-check requests
fi

# A whole-suite run gains little from incremental compilation, whose cache
# for the proxy's crates runs to gigabytes; off unless the caller sets it.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "disk free for the build: $(df -h --output=avail . | tail -1 | tr -d ' ') (a clean build and test run uses about 2.5 GB)"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The code's documentation, private items included: no broken or ambiguous link.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked --document-private-items
cargo test --all-targets --locked
