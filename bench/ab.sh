#!/usr/bin/env bash
# A/B of proxy CPU per request: two pinproxy builds or configurations and the
# hudsucker peer, side by side, in interleaved rounds (A, B, peer; A, B,
# peer; ...), each proxy on its built-in direct path to the same origin.
#
#   bench/ab.sh A_BINARY A_CONFIG B_BINARY B_CONFIG
#
# A config is a pinproxy TOML file (an empty file for the defaults). Prints
# each round's line, then per proxy the median CPU µs per request (utime +
# stime of the proxy's process over the requests it answered; the medians of
# each part beside it, user and kernel) and median requests/s. The suite's
# throughput phase runs 3 rounds of 1.5 s; on a shared 2-core machine single
# runs move by 10-20%, so before/after claims about CPU time want the medians
# of many short rounds: this is for that.
#
# Environment: ROUNDS (12), SECS (2), CONCURRENCY (32), MODE (keep-alive or
# new-conn), LOAD_A / LOAD_B (extra `pinbench load` flags for A's and B's
# runs, e.g. `--cookies t1`; the peer's runs take LOAD_A's, so that A and
# the peer see the same load), PEER (the peer binary; bench/target's by
# default), PROXY_ENV (e.g. TOKIO_WORKER_THREADS=1, for all three proxies),
# ORIGIN_FLAGS (extra `pinbench origin` flags: `--http2` to offer h2, for a
# load with `--http2` in LOAD_A and LOAD_B).
# Needs bench/target/release/pinbench (bench/run.sh builds it). Loopback only.
set -euo pipefail

if (($# != 4)); then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
a_bin=$1 a_config=$2 b_bin=$3 b_config=$4
bench_dir=$(cd "$(dirname "$0")" && pwd)
pinbench=$bench_dir/target/release/pinbench
peer=${PEER:-$bench_dir/target/release/hudsucker-peer}
rounds=${ROUNDS:-12}
secs=${SECS:-2}
concurrency=${CONCURRENCY:-32}
mode=${MODE:-keep-alive}
for file in "$pinbench" "$peer" "$a_bin" "$b_bin" "$a_config" "$b_config"; do
    [ -e "$file" ] || { echo "ab.sh: $file does not exist" >&2; exit 2; }
done

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Waits (at most 30 s) for a line matching $2 in file $1 and prints it.
await_line() {
    for _ in $(seq 300); do
        if grep -m1 -E "$2" "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "ab.sh: nothing matched '$2' in $1 within 30 s:" >&2
    cat "$1" >&2
    return 1
}

# shellcheck disable=SC2086 # ORIGIN_FLAGS is a list of flags
"$pinbench" origin --listen 127.0.0.1:0 --ca-out "$work/origin.pem" ${ORIGIN_FLAGS:-} \
    >"$work/origin.log" 2>&1 &
pids+=($!)
origin=$(await_line "$work/origin.log" '^READY ' | cut -d' ' -f2)

# Starts pinproxy $2 with config $3 as subject $1; sets addr_$1, ca_$1, pid_$1.
start_pinproxy() {
    env ${PROXY_ENV:-} "$2" run --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
        --data-dir "$work/$1" --upstream-ca "$work/origin.pem" --config "$3" \
        >"$work/$1.log" 2>&1 &
    pids+=($!)
    printf -v "pid_$1" %s "$!"
    local line
    line=$(await_line "$work/$1.log" 'listening on ')
    printf -v "addr_$1" %s "${line##* }"
    printf -v "ca_$1" %s "$work/$1/ca.pem"
}
start_pinproxy a "$a_bin" "$a_config"
start_pinproxy b "$b_bin" "$b_config"
env ${PROXY_ENV:-} "$peer" --listen 127.0.0.1:0 --ca-out "$work/peer.pem" \
    --upstream-ca "$work/origin.pem" >"$work/peer.log" 2>&1 &
pids+=($!)
pid_peer=$!
addr_peer=$(await_line "$work/peer.log" '^READY ' | cut -d' ' -f2)
ca_peer=$work/peer.pem

# utime:stime of process $1, in clock ticks.
cpu_ticks() { awk '{print $14 ":" $15}' "/proc/$1/stat"; }
ticks_per_second=$(getconf CLK_TCK)

for round in $(seq "$rounds"); do
    for who in a b peer; do
        pid_var=pid_$who addr_var=addr_$who ca_var=ca_$who
        extra=${LOAD_A:-}
        [ "$who" = b ] && extra=${LOAD_B:-}
        before=$(cpu_ticks "${!pid_var}")
        # shellcheck disable=SC2086 # extra is a list of flags
        result=$("$pinbench" load --target-port "${origin##*:}" --connect-addr "$origin" \
            --proxy "${!addr_var}" --ca "${!ca_var}" --concurrency "$concurrency" \
            --mode "$mode" --secs "$secs" $extra)
        after=$(cpu_ticks "${!pid_var}")
        python3 -c '
import json, sys
who, rnd, secs, before, after, hz = sys.argv[1:7]
result = json.loads(sys.argv[7])
ok = result["ok"]
(user_before, sys_before), (user_after, sys_after) = (
    map(int, ticks.split(":")) for ticks in (before, after))
per_request = lambda ticks: ticks * 1e6 / int(hz) / max(ok, 1)
user_us, sys_us = per_request(user_after - user_before), per_request(sys_after - sys_before)
print(f"round {rnd} {who} {user_us + sys_us:.1f} us/request {ok / float(secs):.0f} requests/s"
      f" user {user_us:.1f} sys {sys_us:.1f}")
' "$who" "$round" "$secs" "$before" "$after" "$ticks_per_second" "$result"
    done
done | tee "$work/rounds.txt"

python3 - "$work/rounds.txt" <<'PY'
import statistics, sys
cpu, rps, user, kernel = {}, {}, {}, {}
for line in open(sys.argv[1]):
    _, _, who, us, _, per_s, _, _, user_us, _, sys_us = line.split()
    cpu.setdefault(who, []).append(float(us))
    rps.setdefault(who, []).append(float(per_s))
    user.setdefault(who, []).append(float(user_us))
    kernel.setdefault(who, []).append(float(sys_us))
for who in ("a", "b", "peer"):
    print(f"median {who}: {statistics.median(cpu[who]):.1f} us/request "
          f"(user {statistics.median(user[who]):.1f}, kernel {statistics.median(kernel[who]):.1f}), "
          f"{statistics.median(rps[who]):.0f} requests/s")
print(f"b/a CPU per request: {statistics.median(cpu['b']) / statistics.median(cpu['a']):.3f}")
PY
