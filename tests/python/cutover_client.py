"""A psycopg 3 client that keeps writing through the pgshift proxy across a
cutover, on one persistent connection with server-side prepared statements.

Usage: cutover_client.py DSN STOPFILE OUTFILE
Runs until STOPFILE exists, then writes OUTFILE (JSON):
  committed: [[id, server_port], ...] for every acknowledged COMMIT
  failures: error texts of failed transactions
  prepared_before / prepared_after: names in pg_prepared_statements
  settings_after: the session settings it set before the cutover
  listening_after: the channels it listens to at the end (it LISTENs first)
"""

import json
import os
import sys
import time

import psycopg

dsn, stopfile, outfile = sys.argv[1:4]
committed, failures = [], []

# prepare_threshold=0: every statement is prepared server side at first use
# and afterwards executed by name only; a backend without them would fail.
conn = psycopg.connect(dsn, prepare_threshold=0)
conn.execute("SET search_path = public")
conn.execute("SET statement_timeout = '31s'")
# A LISTEN moves with the session: the channel is still listened to after
# every switch (reported as listening_after).
conn.execute("LISTEN pgshift_client")
conn.commit()

INSERT = "INSERT INTO ledger (client, note) VALUES (%s, %s) RETURNING id, inet_server_port()"
COUNT = "SELECT count(*) FROM items WHERE id <= %s"

# Warm up so the statements are prepared before the cutover (commit, not
# rollback: psycopg deallocates all its statements after a ROLLBACK).
for _ in range(3):
    conn.execute(COUNT, (10,)).fetchone()
    conn.commit()
prepared_before = [r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements ORDER BY 1")]
conn.commit()

i = 0
while not os.path.exists(stopfile):
    i += 1
    try:
        with conn.transaction():
            row = conn.execute(INSERT, ("psycopg", f"n{i}")).fetchone()
            n = conn.execute(COUNT, (50,)).fetchone()[0]
            if n != 50:
                raise AssertionError(f"items count {n}")
        committed.append([row[0], row[1]])
    except Exception as e:  # every failed transaction is recorded, not hidden
        failures.append(f"{type(e).__name__}: {e}")
        if conn.closed:
            break
    time.sleep(0.01)

if not conn.closed:
    prepared_after = [r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements ORDER BY 1")]
    settings_after = {
        "search_path": conn.execute("SHOW search_path").fetchone()[0],
        "statement_timeout": conn.execute("SHOW statement_timeout").fetchone()[0],
        "port": conn.execute("SELECT inet_server_port()").fetchone()[0],
    }
    listening_after = [r[0] for r in conn.execute("SELECT pg_listening_channels()")]
    conn.commit()
else:
    prepared_after, settings_after, listening_after = [], {}, []

with open(outfile, "w") as f:
    json.dump(
        {
            "committed": committed,
            "failures": failures,
            "prepared_before": prepared_before,
            "prepared_after": prepared_after,
            "settings_after": settings_after,
            "listening_after": listening_after,
        },
        f,
    )
