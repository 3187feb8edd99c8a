#!/usr/bin/env bash
# pinproxy's benchmark suite, in one command (see bench/README.md):
#   bench/run.sh [pinbench suite options, e.g. --rounds 1 --secs 0.5 for a quick look]
#   bench/run.sh --clean-build    # also time a clean release build (~10 min more)
#
# Installs what is missing (BoringSSL's build tools through
# scripts/build-deps.sh, a C toolchain for the build, Python for
# mitmproxy, mitmproxy itself in a venv under bench/target, valgrind for the
# instruction counts, redis-server), builds pinproxy (`cargo build
# --release` at the repository root), the bench tools and the hudsucker
# peer (bench/peer) in release, then runs everything on 127.0.0.0/8 only and
# writes bench/BENCHMARKS.md. Every load is bounded in requests and time; see
# bench/README.md for how long a run takes.
set -euo pipefail

bench_dir="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$bench_dir/.." && pwd)"
started=$(date +%s)
say() { echo "[run.sh] $*" >&2; }

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        $sudo apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- 1. what the build and the run need ------------------------------------
command -v cargo >/dev/null || { say "cargo is missing: install a Rust toolchain (rustup) first"; exit 1; }
# The build's own tools (cmake, clang, git, ... for BoringSSL), as the
# README's two commands install them.
"$root/scripts/build-deps.sh"
missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt_install "${missing[@]}"
fi
# The Redis rows and the fleet chapter: optional, left out if this fails.
if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
    say "installing redis-server"
    apt_install redis-server || say "redis-server is not installable; no Redis rows, no fleet chapter"
fi
# Instruction counts (callgrind): optional, left out with a note if this fails.
if ! command -v valgrind >/dev/null; then
    say "installing valgrind"
    apt_install valgrind || say "valgrind is not installable; no instruction counts"
fi

# mitmproxy for setup (e): an existing mitmdump, or one in our own venv.
venv="$bench_dir/target/mitmproxy-venv"
mitmdump=""
mitm_missing=""
if command -v mitmdump >/dev/null && mitmdump --version >/dev/null 2>&1; then
    mitmdump="$(command -v mitmdump)"
elif [ -x "$venv/bin/mitmdump" ] && "$venv/bin/mitmdump" --version >/dev/null 2>&1; then
    mitmdump="$venv/bin/mitmdump"
else
    say "installing mitmproxy into $venv (pip)"
    mkdir -p "$bench_dir/target"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        apt_install python3-venv || true
        python3 -m venv "$venv" >/dev/null 2>&1 || true
    fi
    pip_log="$bench_dir/target/mitmproxy-pip.log"
    if [ -x "$venv/bin/pip" ] \
        && timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check mitmproxy >"$pip_log" 2>&1 \
        && "$venv/bin/mitmdump" --version >/dev/null 2>&1; then
        mitmdump="$venv/bin/mitmdump"
    else
        mitm_missing="pip install mitmproxy failed: $(tail -n 1 "$pip_log" 2>/dev/null || echo 'no venv')"
        say "mitmproxy is not installable; setup (e) will be reported as such ($mitm_missing)"
    fi
fi

# 10,000 idle tunnels need 10,000+ descriptors in pinproxy and in the holder.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 10500 ]; then
    say "warning: only $(ulimit -n) file descriptors allowed; the 10,000-tunnel step may fail"
fi

# --- 2. build ---------------------------------------------------------------
say "building pinproxy (release)"
(cd "$root" && env -u CARGO_TARGET_DIR cargo build --release --quiet)
say "building the bench tools (release)"
# PINBENCH_LIBRARY=1 adds the in-process leaf timing, which compiles
# pinproxy's library once more (a few minutes on 2 cores).
features=()
[ "${PINBENCH_LIBRARY:-}" = 1 ] && features=(--features library)
(cd "$bench_dir" && env -u CARGO_TARGET_DIR cargo build --release --quiet "${features[@]}")
pinproxy="$root/target/release/pinproxy"
pinbench="$bench_dir/target/release/pinbench"

# The peer, setup (f): a plain MITM on the hudsucker crate, its own Cargo
# project so that a failure here only costs (f) and its comparisons.
say "building the hudsucker peer (release)"
peer="$bench_dir/target/release/hudsucker-peer"
peer_log="$bench_dir/target/peer-build.log"
peer_missing=""
if ! (cd "$bench_dir/peer" && env -u CARGO_TARGET_DIR cargo build --release --quiet \
    --target-dir "$bench_dir/target") >"$peer_log" 2>&1; then
    peer_missing="cargo build of bench/peer failed: $(grep -m1 -E '^error' "$peer_log" || tail -n 1 "$peer_log")"
    say "the hudsucker peer did not build; setup (f) will be reported as such (see $peer_log)"
fi
# The heap counter preloaded into the pin phase's pinproxy (bytes per pin
# from the allocator, not RSS): optional, RSS only if it does not build or load.
heap_lib="$bench_dir/target/libpinbench-heap.so"
if ! cc -O2 -shared -fPIC -o "$heap_lib" "$bench_dir/heapcount/heapcount.c" 2>"$bench_dir/target/heapcount-build.log" \
    || ! LD_PRELOAD="$heap_lib" /bin/true 2>>"$bench_dir/target/heapcount-build.log"; then
    say "the heap counter did not build or load (see bench/target/heapcount-build.log); bytes per pin from RSS only"
    heap_lib=""
fi
peer_label="hudsucker $(awk '/^name = "hudsucker"$/ { getline; gsub(/version = |"/, ""); print; exit }' \
    "$bench_dir/peer/Cargo.lock" 2>/dev/null)"

revision="unknown"
if git -C "$root" rev-parse --short HEAD >/dev/null 2>&1; then
    revision="$(git -C "$root" rev-parse --short HEAD)"
    if [ -n "$(git -C "$root" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
        revision="$revision + uncommitted changes"
    fi
fi

# --- 3. run -----------------------------------------------------------------
work="$(mktemp -d -t pinbench-run.XXXXXX)"
suite_pid=""
cleanup() {
    # End the suite and whatever it started (recorded by PID), then the scratch files.
    if [ -n "$suite_pid" ] && kill -0 "$suite_pid" 2>/dev/null; then
        kill "$suite_pid" 2>/dev/null || true
    fi
    if [ -f "$work/pids" ]; then
        while read -r pid; do
            kill "$pid" 2>/dev/null || true
        done <"$work/pids"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

args=(suite --pinproxy "$pinproxy" --out "$bench_dir/BENCHMARKS.md"
    --raw-out "$bench_dir/target/results.json" --work-dir "$work"
    --revision "$revision" --setup-secs "$(($(date +%s) - started))"
    --source-dir "$root" --callgrind-dir "$bench_dir/target/callgrind")
[ -n "$heap_lib" ] && args+=(--heap-counter "$heap_lib")
if [ -n "$mitmdump" ]; then
    args+=(--mitmdump "$mitmdump")
else
    args+=(--mitmproxy-missing "$mitm_missing")
fi
if [ -z "$peer_missing" ] && [ -x "$peer" ]; then
    args+=(--peer "$peer" --peer-label "$peer_label")
else
    args+=(--peer-missing "${peer_missing:-no binary at $peer}")
fi
say "measuring (progress below)"
"$pinbench" "${args[@]}" "$@" &
suite_pid=$!
wait "$suite_pid"
suite_pid=""
# The report's path: run.sh's, unless an --out among the arguments overrides it.
report="$bench_dir/BENCHMARKS.md"
prev=""
for arg in "$@"; do
    case "$arg" in
        --out=*) report="${arg#--out=}" ;;
        *) [ "$prev" = --out ] && report="$arg" ;;
    esac
    prev="$arg"
done
say "done in $(($(date +%s) - started)) s: $report"
