"""psycopg 3 through the pgshift proxy: transactions, server-side prepared
statements, pipeline mode, COPY, LISTEN/NOTIFY, cancel of pg_sleep and error
recovery. Usage: proxy_psycopg.py DSN. Prints ALL OK on success."""

import sys
import threading
import time

import psycopg
from psycopg import errors

dsn = sys.argv[1]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


with psycopg.connect(dsn, autocommit=True) as setup:
    setup.execute("DROP TABLE IF EXISTS items")
    setup.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")

# Transactions: commit and rollback.
with psycopg.connect(dsn) as conn:
    with conn.transaction():
        conn.execute("INSERT INTO items VALUES (1, 'one'), (2, 'two')")
    try:
        with conn.transaction():
            conn.execute("INSERT INTO items VALUES (3, 'three')")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    n = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    check(n == 2, f"rollback kept {n} rows")

# Server-side prepared statements (prepare on first use) and pipeline mode.
with psycopg.connect(dsn, prepare_threshold=0) as conn:
    for i in range(10, 20):
        conn.execute("INSERT INTO items VALUES (%s, %s)", (i, f"n{i}"))
    conn.commit()
    prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
    check(prepared >= 1, "no server-side prepared statement")
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int * 3", (i,)) for i in range(20)]
    check([c.fetchone()[0] for c in curs] == [i * 3 for i in range(20)], "pipeline results")
    conn.commit()

# COPY in and out.
with psycopg.connect(dsn) as conn:
    with conn.cursor() as cur:
        with cur.copy("COPY items (id, name) FROM STDIN") as copy:
            for i in range(100, 1100):
                copy.write_row((i, f"copied {i}"))
        conn.commit()
        rows = []
        with cur.copy("COPY (SELECT id, name FROM items WHERE id >= 100 ORDER BY id) TO STDOUT") as copy:
            for row in copy.rows():
                rows.append(row)
        check(len(rows) == 1000 and rows[0] == ("100", "copied 100"), f"copy out {rows[:2]}")

# LISTEN / NOTIFY: the notification arrives on an idle connection.
with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn, autocommit=True) as talker:
    listener.execute("LISTEN jobs")
    talker.execute("NOTIFY jobs, 'job-42'")
    got = None
    for n in listener.notifies(timeout=120, stop_after=1):
        got = (n.channel, n.payload)
    check(got == ("jobs", "job-42"), f"notification {got}")

# Cancel a running pg_sleep from another thread, once it runs on the server
# (a cancel sent before it has started reaches nothing).
with psycopg.connect(dsn) as conn, psycopg.connect(dsn, autocommit=True) as watcher:
    def cancel_soon():
        deadline = time.time() + 120
        while time.time() < deadline and not watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'"
        ).fetchone()[0]:
            time.sleep(0.02)
        if hasattr(conn, "cancel_safe"):
            conn.cancel_safe()
        else:
            conn.cancel()

    t = threading.Thread(target=cancel_soon)
    t.start()
    started = time.time()
    try:
        conn.execute("SELECT pg_sleep(30)")
        check(False, "pg_sleep was not cancelled")
    except errors.QueryCanceled:
        pass
    t.join()
    check(time.time() - started < 30, "pg_sleep ran to its end")
    conn.rollback()
    check(conn.execute("SELECT 1").fetchone()[0] == 1, "session after cancel")

# Error recovery: a failed transaction, rollback, carry on.
with psycopg.connect(dsn) as conn:
    try:
        conn.execute("INSERT INTO items VALUES (1, 'dup')")
        check(False, "duplicate accepted")
    except errors.UniqueViolation:
        pass
    try:
        conn.execute("SELECT 1")
        check(False, "aborted transaction accepted a query")
    except errors.InFailedSqlTransaction:
        pass
    conn.rollback()
    n = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    check(n == 1012, f"count after recovery {n}")

print("ALL OK")
