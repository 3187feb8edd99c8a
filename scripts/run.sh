#!/usr/bin/env bash
# Starts pinproxy on a fresh Debian machine: installs the build tools when
# missing (scripts/build-deps.sh), builds in release mode and runs
# `pinproxy run` with any extra arguments, e.g.
#   scripts/run.sh --exit res1=http://user:pass@proxy.example:8080
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
exec cargo run --release --locked -- run "$@"
