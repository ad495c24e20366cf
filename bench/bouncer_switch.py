#!/usr/bin/env python3
"""PgBouncer's manual switchover, timed: PAUSE → marker row on the source →
wait until the subscription applied it on the target → copy sequence values
→ repoint the [databases] line → RELOAD → RESUME. Held connections (console,
source, target) are opened beforehand so only the procedure is timed.

    bouncer_switch.py BOUNCER_PORT SRC_PORT TGT_PORT DB INI PASSWORD

Prints one line: pause_seconds catchup_seconds.
"""
import re
import sys
import time

import psycopg

bport, sport, tport, db, ini, pw = sys.argv[1:7]


def conn(port, dbname):
    return psycopg.connect(host="127.0.0.1", port=port, dbname=dbname, user="postgres",
                           password=pw, sslmode="disable", autocommit=True,
                           cursor_factory=psycopg.ClientCursor)


console = conn(bport, "pgbouncer")
src = conn(sport, db)
tgt = conn(tport, db)
src.execute("CREATE TABLE IF NOT EXISTS bench_switch_marker (id int PRIMARY KEY)")
marker = int(time.time() * 1000) % 2_000_000_000
seqs = [r[0] for r in src.execute(
    "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences").fetchall()]
with open(ini) as f:
    text = f.read()
new_text = re.sub(r"(?m)^(" + re.escape(db) + r" = host=127\.0\.0\.1 port=)\d+", r"\g<1>" + tport, text)

t0 = time.monotonic()
console.execute(f"PAUSE {db}")
t_paused = time.monotonic()
src.execute(f"INSERT INTO bench_switch_marker VALUES ({marker})")
while tgt.execute(f"SELECT count(*) FROM bench_switch_marker WHERE id = {marker}").fetchone()[0] == 0:
    time.sleep(0.002)
t_caught = time.monotonic()
for s in seqs:
    v = src.execute(f"SELECT last_value, is_called FROM {s}").fetchone()
    tgt.execute(f"SELECT setval('{s}', {v[0]}, {'true' if v[1] else 'false'})")
with open(ini, "w") as f:
    f.write(new_text)
console.execute("RELOAD")
console.execute(f"RESUME {db}")
t1 = time.monotonic()
print(f"{t1 - t0:.4f} {t_caught - t_paused:.4f}")
