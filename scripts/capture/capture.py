#!/usr/bin/env python3
"""Capture the first bytes a client sends to a TCP listener on 127.0.0.1.

Used to make the test fixtures under tests/fixtures/. Listens on 127.0.0.1
only, accepts ONE connection, and writes what the client sent as lower-case
hex (64 bytes per line) to OUT, then closes the connection so the client gives
up. Everything is bounded: accept waits at most --accept-timeout seconds, the
read stops at 64 KiB, after --idle seconds without new bytes, or after
--read-timeout seconds in all.

Modes:
  tls   stop as soon as the TLS records hold a whole ClientHello
  idle  stop when the client goes quiet (for the h2c preface)
  h2    terminate TLS (the given self-signed certificate, ALPN h2 only),
        then capture the decrypted bytes until the client goes quiet: the
        client's HTTP/2 connection opening

The port is written to PORTFILE as soon as the socket listens, so a driver
script can start the client after it.
"""

import argparse
import socket
import ssl
import sys
import time

CAP = 64 * 1024


def tls_hello_complete(buf: bytes) -> bool:
    """True once the handshake records in buf hold a whole ClientHello."""
    body = bytearray()
    pos = 0
    for _ in range(64):  # bounded: no real hello spans 64 records
        if len(buf) - pos < 5:
            break
        length = int.from_bytes(buf[pos + 3:pos + 5], "big")
        if len(buf) - pos - 5 < length:
            break
        body += buf[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(body) >= 4 and len(body) >= 4 + int.from_bytes(body[1:4], "big"):
            return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["tls", "idle", "h2"])
    ap.add_argument("out")
    ap.add_argument("portfile")
    ap.add_argument("--accept-timeout", type=float, default=30.0)
    ap.add_argument("--read-timeout", type=float, default=10.0)
    ap.add_argument("--idle", type=float, default=1.0)
    ap.add_argument("--cert", help="PEM certificate chain (mode h2)")
    ap.add_argument("--key", help="PEM private key (mode h2)")
    args = ap.parse_args()

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(args.accept_timeout)
    with open(args.portfile, "w") as f:
        f.write(str(srv.getsockname()[1]))

    if args.mode == "h2":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.set_alpn_protocols(["h2"])
        conn = None
        # Browsers may open a spare connection and drop it mid-handshake:
        # take the first of a few connections that completes a handshake.
        for _ in range(4):
            raw, _ = srv.accept()
            raw.settimeout(args.read_timeout)
            try:
                conn = ctx.wrap_socket(raw, server_side=True)
                break
            except (ssl.SSLError, OSError) as e:
                print(f"handshake failed: {e}", file=sys.stderr)
                raw.close()
        if conn is None:
            return 1
    else:
        conn, _ = srv.accept()
    conn.settimeout(args.idle)
    buf = b""
    deadline = time.monotonic() + args.read_timeout
    while len(buf) < CAP and time.monotonic() < deadline:
        try:
            chunk = conn.recv(CAP - len(buf))
        except socket.timeout:
            if buf and args.mode != "tls":
                break
            continue
        if not chunk:
            break
        buf += chunk
        if args.mode == "tls" and tls_hello_complete(buf):
            break
    conn.close()
    srv.close()

    hexed = buf.hex()
    with open(args.out, "w") as f:
        for i in range(0, len(hexed), 128):
            f.write(hexed[i:i + 128] + "\n")
    print(f"captured {len(buf)} bytes -> {args.out}", file=sys.stderr)
    return 0 if buf else 1


if __name__ == "__main__":
    sys.exit(main())
