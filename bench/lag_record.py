#!/usr/bin/env python3
"""Record pgshift's /status every 200 ms to a CSV until killed (SIGTERM/SIGINT).

    lag_record.py URL OUT.csv [INTERVAL_S]

Columns: t (seconds since start), state, substate, lag_bytes, lag_seconds,
transactions_applied, cutover_outcome, pause_seconds. bench/lag_plot.py
draws it.
"""
import csv
import json
import signal
import sys
import time
import urllib.request

url, out = sys.argv[1], sys.argv[2]
interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2
running = True


def stop(*_):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)

start = time.monotonic()
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["t", "state", "substate", "lag_bytes", "lag_seconds",
                "transactions_applied", "cutover_outcome", "pause_seconds"])
    while running:
        t = time.monotonic() - start
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                s = json.load(r)
        except (OSError, ValueError):
            s = None
        if s is not None:
            dbs = s.get("databases") or {}
            db = next(iter(dbs.values()), {}) if isinstance(dbs, dict) else {}
            st = (db or {}).get("stream") or {}
            cut = s.get("last_cutover") or {}
            w.writerow([f"{t:.3f}", s.get("state", ""), s.get("substate", ""),
                        st.get("lag_bytes", ""), st.get("lag_seconds", ""),
                        st.get("transactions_applied", ""),
                        cut.get("outcome", ""), cut.get("pause_seconds", "")])
            f.flush()
        time.sleep(max(0.0, interval - (time.monotonic() - start - t)))
