#!/usr/bin/env bash
# Recreate the fixtures in tests/fixtures/hello from the clients on this machine.
# All traffic goes to 127.0.0.1; every wait is bounded; only processes this
# script started are stopped, by PID.
#
#   scripts/capture/capture_all.sh [NAME...]      (default: every capture below)
set -u
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../../tests/fixtures/hello"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A throw-away self-signed certificate for the "h2" captures (TLS terminated
# by the listener; the clients are told not to verify it).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=x.example -addext subjectAltName=DNS:x.example \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

# capture MODE NAME CLIENT-COMMAND... ; "@PORT@" in the command is the port.
capture() {
    local mode=$1 name=$2
    shift 2
    local portfile="$work/$name.port"
    rm -f "$portfile"
    python3 "$here/capture.py" "$mode" "$out/$name.hex" "$portfile" \
        --accept-timeout 30 --read-timeout 10 \
        --cert "$work/cert.pem" --key "$work/key.pem" &
    local cap_pid=$!
    local i
    for i in $(seq 1 100); do
        [ -s "$portfile" ] && break
        sleep 0.1
    done
    local port
    port=$(cat "$portfile" 2>/dev/null || true)
    if [ -z "$port" ]; then
        echo "$name: listener did not start" >&2
        kill "$cap_pid" 2>/dev/null
        return 1
    fi
    local cmd=()
    local arg
    for arg in "$@"; do cmd+=("${arg//@PORT@/$port}"); done
    timeout --kill-after=5 25 "${cmd[@]}" >"$work/$name.client.log" 2>&1
    # The listener exits once it has the hello; give it a bounded grace time.
    for i in $(seq 1 50); do
        kill -0 "$cap_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$cap_pid" 2>/dev/null; then
        kill "$cap_pid" 2>/dev/null
        echo "$name: listener stopped by timeout" >&2
    fi
    wait "$cap_pid" 2>/dev/null
    echo "$name: $(tr -d '\n' <"$out/$name.hex" | wc -c | awk '{print $1/2}') bytes"
}

py_requests='
import socket, sys, requests
port = int(sys.argv[1])
real = socket.getaddrinfo
def fake(host, p, *a, **k):
    # Resolve the test name to loopback only; the URL keeps a domain so the
    # hello carries an SNI.
    if host == "x.example":
        return real("127.0.0.1", p, *a, **k)
    raise OSError("no other names in this test")
socket.getaddrinfo = fake
try:
    requests.get(f"https://x.example:{port}/", timeout=5)
except Exception as e:
    print(type(e).__name__, e)
'

py_ssl='
import socket, ssl, sys
port = int(sys.argv[1])
ctx = ssl.create_default_context()
s = socket.create_connection(("127.0.0.1", port), timeout=5)
try:
    ctx.wrap_socket(s, server_hostname="x.example")
except Exception as e:
    print(type(e).__name__, e)
'

# Chromium in a throw-away profile; its only name resolution maps x.example to
# the listener, and QUIC is off so the hello goes over TCP.
chromium_sh='
dir=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --ignore-certificate-errors \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$dir" --host-resolver-rules="MAP x.example 127.0.0.1:$1" \
    https://x.example/
rc=$?
rm -rf "$dir"
exit $rc
'

want() {
    [ ${#names[@]} -eq 0 ] && return 0
    local n
    for n in "${names[@]}"; do [ "$n" = "$1" ] && return 0; done
    return 1
}
names=("$@")

want curl_h2 && capture tls curl_h2 /usr/bin/curl -s -k --http2 --max-time 5 \
    --connect-to x.example:443:127.0.0.1:@PORT@ https://x.example/
want curl_h1 && capture tls curl_h1 /usr/bin/curl -s -k --http1.1 --max-time 5 \
    --connect-to x.example:443:127.0.0.1:@PORT@ https://x.example/
# "python3" is the first on PATH (here pyenv's CPython 3.11.7 with requests
# 2.34.2 / urllib3 2.7.0); Debian's /usr/bin/python3 (3.11.2, requests 2.28.1,
# urllib3 1.26.12) offers other ciphers, so it has a fixture of its own.
want python_requests && capture tls python_requests python3 -c "$py_requests" @PORT@
want python_ssl && capture tls python_ssl python3 -c "$py_ssl" @PORT@
want python_requests_debian && capture tls python_requests_debian /usr/bin/python3 -c "$py_requests" @PORT@
if [ -x /usr/bin/chromium ]; then
    want chromium_1 && capture tls chromium_1 bash -c "$chromium_sh" _ @PORT@
    want chromium_2 && capture tls chromium_2 bash -c "$chromium_sh" _ @PORT@
    want chromium_h2 && capture h2 chromium_h2 bash -c "$chromium_sh" _ @PORT@
fi
want curl_h2_tls && capture h2 curl_h2_tls /usr/bin/curl -s -k --http2 --max-time 5 \
    --connect-to x.example:443:127.0.0.1:@PORT@ https://x.example/
# The rustls and hyper_h2c fixtures came from two small throw-away Rust
# programs (a rustls 0.23 client as pinproxy configures it, and hyper's h2c
# client with default settings); they are not kept here.
want curl_h2c && capture idle curl_h2c /usr/bin/curl -s --http2-prior-knowledge --max-time 5 \
    http://127.0.0.1:@PORT@/
exit 0
