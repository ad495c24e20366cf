"""A psycopg 3 client with server-side prepared statements (prepare_threshold=0)
and a session setting, writing a ledger until the file STOP exists while the
test moves its session to another server. Usage: move_psycopg.py DSN STOP.
Prints JSON: committed ids, failures, and what the session looks like at the
end."""

import json
import os
import sys
import time

import psycopg

dsn, stop = sys.argv[1], sys.argv[2]
conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=0)
conn.execute("SET application_name = 'mover'")
committed, failed, errors = [], 0, []
i = 0
while not os.path.exists(stop):
    i += 1
    try:
        with conn.transaction():
            conn.execute("INSERT INTO ledger (id, note) VALUES (%s, %s)", (i, "x"))
            n = conn.execute("SELECT count(*) FROM ledger WHERE id = %s", (i,)).fetchone()[0]
            if n != 1:
                raise AssertionError(f"row {i} not visible in its transaction")
        committed.append(i)
    except Exception as e:  # reported to the test, which expects none
        failed += 1
        errors.append(str(e))
        if conn.closed:
            break
    time.sleep(0.005)
prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
print(
    json.dumps(
        {
            "committed": committed,
            "failed": failed,
            "errors": errors[:5],
            "application_name": conn.execute("SHOW application_name").fetchone()[0],
            "server": conn.execute("SELECT v FROM whoami").fetchone()[0],
            "prepared": prepared,
        }
    )
)
