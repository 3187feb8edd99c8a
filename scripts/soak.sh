#!/usr/bin/env bash
# A bounded soak (not part of CI): good and bad clients against pinproxy
# (the real binary) over four tinyproxy exits egressing from 127.0.0.2..5,
# for MINUTES minutes (default 2). Prints resident memory every 15 s, then
# outcomes by kind, memory first/min/max/last/after, and leaks (a cookie
# presented from the wrong exit, as the test origin checks); fails on any
# leak or any smuggled request reaching the origin. Loopback only.
#
#   scripts/soak.sh 10                    # 10 minutes, 8 good and 40 bad clients
#   SOAK_GOOD=32 SOAK_BAD=100 scripts/soak.sh 5
#   SOAK_PROFILE=release scripts/soak.sh 30   # measure the release binary
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-2}"
command -v tinyproxy >/dev/null 2>&1 || {
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends tinyproxy >/dev/null
}
profile=()
[ "${SOAK_PROFILE:-dev}" = release ] && profile=(--release)
SOAK_MINUTES="$minutes" exec cargo test "${profile[@]}" --test suite soak:: -- --ignored --nocapture
