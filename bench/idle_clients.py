#!/usr/bin/env python3
"""Opens N idle PostgreSQL client connections and holds them until stdin closes.

    [QUERY=sql] idle_clients.py HOST PORT USER PASSWORD DATABASE N [CONCURRENCY]

HOST is an address or a Unix socket directory. Each connection does the
startup and SCRAM-SHA-256 (or cleartext/md5/trust) authentication on raw
asyncio streams — a few KB per connection on this side — runs one query
(QUERY, default SELECT 1; empty: none), waits for ReadyForQuery, then sits
idle. Prints "open N SECONDS" once all are open and
"failed K: first error" if some were refused, then waits for stdin to close
(the caller measures the proxy meanwhile) and closes them with Terminate.
"""
import asyncio
import base64
import hashlib
import hmac
import os
import struct
import sys
import time


def msg(tag, body):
    return tag + struct.pack("!I", len(body) + 4) + body


async def read_msg(r):
    head = await r.readexactly(5)
    (n,) = struct.unpack("!I", head[1:])
    return head[:1], await r.readexactly(n - 4)


class Scram:
    def __init__(self, password):
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"

    def first(self):
        data = ("n,," + self.first_bare).encode()
        return b"SCRAM-SHA-256\0" + struct.pack("!I", len(data)) + data

    def final(self, server_first):
        fields = dict(kv.split("=", 1) for kv in server_first.decode().split(","))
        salt, iters, nonce = base64.b64decode(fields["s"]), int(fields["i"]), fields["r"]
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iters)
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        stored = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_msg = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        sig = hmac.new(stored, auth_msg, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, sig))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


async def open_one(host, port, user, password, db, query):
    if host.startswith("/"):
        r, w = await asyncio.open_unix_connection(os.path.join(host, f".s.PGSQL.{port}"), limit=1024)
    else:
        r, w = await asyncio.open_connection(host, port, limit=1024)
    params = f"user\0{user}\0database\0{db}\0\0".encode()
    body = struct.pack("!I", 196608) + params
    w.write(struct.pack("!I", len(body) + 4) + body)
    scram = None
    while True:
        tag, body = await read_msg(r)
        if tag == b"R":
            (code,) = struct.unpack("!I", body[:4])
            if code == 0:
                continue
            if code == 3:
                w.write(msg(b"p", password.encode() + b"\0"))
            elif code == 5:
                inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
                outer = hashlib.md5(inner + body[4:8]).hexdigest()
                w.write(msg(b"p", b"md5" + outer.encode() + b"\0"))
            elif code == 10:
                scram = Scram(password)
                w.write(msg(b"p", scram.first()))
            elif code == 11:
                w.write(msg(b"p", scram.final(body[4:])))
            elif code == 12:
                continue
            else:
                raise RuntimeError(f"unsupported authentication request {code}")
        elif tag == b"E":
            raise RuntimeError(body.replace(b"\0", b" ").decode(errors="replace").strip())
        elif tag == b"Z":
            if query is None:
                return r, w
            # One query, then idle: a session-mode pool gives the client
            # its server connection at its first query, not at login.
            w.write(msg(b"Q", query.encode() + b"\0"))
            query = None


async def main():
    host, port, user, password, db, n = sys.argv[1:7]
    n = int(n)
    concurrency = int(sys.argv[7]) if len(sys.argv) > 7 else 64
    query = os.environ.get("QUERY", "SELECT 1") or None
    gate = asyncio.Semaphore(concurrency)
    conns, errors = [], []

    async def one():
        async with gate:
            try:
                conns.append(await asyncio.wait_for(open_one(host, int(port), user, password, db, query), 60))
            except Exception as e:  # noqa: BLE001 — counted and reported
                errors.append(repr(e))

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    print(f"open {len(conns)} {time.monotonic() - start:.1f}", flush=True)
    if errors:
        print(f"failed {len(errors)}: {errors[0]}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for _, w in conns:
        w.write(msg(b"X", b""))
        w.close()
    for _, w in conns:
        try:
            await w.wait_closed()
        except OSError:
            pass


asyncio.run(main())
