#!/usr/bin/env bash
# Installs, when missing, the system tools pinproxy's build needs on a fresh
# Debian machine: BoringSSL (the upstream TLS stack that can say what a
# browser says) is built from source by the `boring-sys` crate with cmake,
# clang/libclang (bindgen), a C++ compiler and git. Run by scripts/run.sh
# and scripts/test.sh; safe to run repeatedly.
set -euo pipefail

build_missing=()
command -v cmake >/dev/null 2>&1 || build_missing+=(cmake)
command -v g++ >/dev/null 2>&1 || build_missing+=(g++)
command -v clang >/dev/null 2>&1 || build_missing+=(clang)
command -v git >/dev/null 2>&1 || build_missing+=(git)
# bindgen loads libclang at build time.
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || build_missing+=(libclang-dev)

if ((${#build_missing[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing build tools for BoringSSL: ${build_missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${build_missing[@]}" >/dev/null
fi
