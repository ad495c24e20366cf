#!/usr/bin/env python3
"""PgBouncer's manual switchover, timed: PAUSE → marker row on the source →
wait until the subscription applied it on the target → copy sequence values
→ repoint the [databases] line → RELOAD → RESUME. Held connections (console,
source, target) are opened beforehand so only the procedure is timed.

    bouncer_switch.py BOUNCER_PORT SRC_PORT TGT_PORT DB[,DB...] INI PASSWORD

With several databases, PAUSE holds them all, each gets its marker and its
sequences, and every [databases] line is repointed before the one RESUME.
Prints one line: pause_seconds catchup_seconds pause_start_epoch pause_end_epoch.
"""
import re
import sys
import time

import psycopg

bport, sport, tport, dbs, ini, pw = sys.argv[1:7]
dbs = dbs.split(",")


def conn(port, dbname):
    return psycopg.connect(host="127.0.0.1", port=port, dbname=dbname, user="postgres",
                           password=pw, sslmode="disable", autocommit=True,
                           cursor_factory=psycopg.ClientCursor)


console = conn(bport, "pgbouncer")
src = {db: conn(sport, db) for db in dbs}
tgt = {db: conn(tport, db) for db in dbs}
for c in src.values():
    c.execute("CREATE TABLE IF NOT EXISTS bench_switch_marker (id int PRIMARY KEY)")
marker = int(time.time() * 1000) % 2_000_000_000
seqs = {db: [r[0] for r in src[db].execute(
    "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences").fetchall()] for db in dbs}
with open(ini) as f:
    new_text = f.read()
for db in dbs:
    new_text = re.sub(r"(?m)^(" + re.escape(db) + r" = host=127\.0\.0\.1 port=)\d+", r"\g<1>" + tport, new_text)

t0 = time.monotonic()
e0 = time.time()
# PAUSE without a name holds every database.
console.execute("PAUSE" if len(dbs) > 1 else f"PAUSE {dbs[0]}")
t_paused = time.monotonic()
for db in dbs:
    src[db].execute(f"INSERT INTO bench_switch_marker VALUES ({marker})")
for db in dbs:
    while tgt[db].execute(f"SELECT count(*) FROM bench_switch_marker WHERE id = {marker}").fetchone()[0] == 0:
        time.sleep(0.002)
t_caught = time.monotonic()
for db in dbs:
    for s in seqs[db]:
        v = src[db].execute(f"SELECT last_value, is_called FROM {s}").fetchone()
        tgt[db].execute(f"SELECT setval('{s}', {v[0]}, {'true' if v[1] else 'false'})")
with open(ini, "w") as f:
    f.write(new_text)
console.execute("RELOAD")
console.execute("RESUME" if len(dbs) > 1 else f"RESUME {dbs[0]}")
t1 = time.monotonic()
print(f"{t1 - t0:.4f} {t_caught - t_paused:.4f} {e0:.6f} {e0 + (t1 - t0):.6f}")
