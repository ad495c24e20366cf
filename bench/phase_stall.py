#!/usr/bin/env python3
"""What clients felt in each phase of a switch: the longest transaction
(pgbench -l latency, which under -R counts from the scheduled start, so a
held request counts its wait) among those in progress during each window.

    phase_stall.py WINDOWS_JSON LOG_GLOB...

WINDOWS_JSON is either pgshift's /status (its last_cutover phases, each with
started_at and seconds) or {"pause": [start_epoch, end_epoch]} for a
procedure timed from outside (PgBouncer's). Windows: prewarm, catchup (before
the gate closes, pgshift only), pause (gate closed -> opened), after (the
second after the gate opened), and for reference before (a second ending a
second before the first phase: what this machine's noise alone does).
Prints one line: name=ms ... (max latency of the transactions overlapping
each window, 0 when none did) and the median latency outside every window
as base=ms.
"""
import glob
import json
import sys
from datetime import datetime

AFTER = 1.0


def epoch(rfc3339):
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def windows(doc):
    if "pause" in doc:
        s, e = doc["pause"]
        return {"before": (s - 2 * AFTER, s - AFTER), "pause": (s, e), "after": (e, e + AFTER)}
    c = doc.get("last_cutover") or {}
    w = {}
    for p in c.get("phases", []):
        if p.get("started_at") and p["phase"] in ("prewarm", "catchup", "gate"):
            s = epoch(p["started_at"])
            w[p["phase"]] = (s, s + p["seconds"])
    first = min((epoch(p["started_at"]) for p in c.get("phases", []) if p.get("started_at")), default=None)
    if first is not None:
        w["before"] = (first - 2 * AFTER, first - AFTER)
    if "gate" in w and c.get("pause_seconds") is not None:
        s = w.pop("gate")[0]
        e = s + c["pause_seconds"]
        w["pause"] = (s, e)
        w["after"] = (e, e + AFTER)
    return w


def transactions(paths):
    for path in paths:
        with open(path) as f:
            for line in f:
                v = line.split()
                # client tx_no time_us script epoch_s epoch_us [lag_us]
                if len(v) >= 6 and v[2].isdigit():
                    end = int(v[4]) + int(v[5]) / 1e6
                    lat = int(v[2]) / 1e6
                    yield end - lat, end, lat


def main():
    doc = json.load(open(sys.argv[1]))
    w = windows(doc)
    paths = [p for g in sys.argv[2:] for p in glob.glob(g)]
    worst = {k: 0.0 for k in ("before", "prewarm", "catchup", "pause", "after") if k in w}
    outside = []
    for start, end, lat in transactions(paths):
        hit = False
        for k, (ws, we) in w.items():
            if start < we and end > ws:
                worst[k] = max(worst[k], lat)
                hit = True
        if not hit:
            outside.append(lat)
    outside.sort()
    base = outside[len(outside) // 2] if outside else 0.0
    print(" ".join(f"{k}={v * 1000:.1f}" for k, v in worst.items()) + f" base={base * 1000:.1f}")


main()
