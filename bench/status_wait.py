#!/usr/bin/env python3
"""Poll pgshift's /status until a condition holds; print the seconds it took.

    status_wait.py URL CONDITION TIMEOUT_S

CONDITION is a Python expression over `s` (the /status document) and `db`
(its first database's entry). Exits 1 if the migration fails or the timeout
passes, printing the last document to stderr. An unreachable admin port
(pgshift still starting) just means "not yet".
"""
import json
import sys
import time
import urllib.request

url, cond, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
start = time.monotonic()
doc = None
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            doc = json.load(r)
    except (OSError, ValueError):
        doc = None
    if doc is not None:
        s = doc
        dbs = s.get("databases") or {}
        db = next(iter(dbs.values()), {}) if isinstance(dbs, dict) else {}
        if s.get("state") in ("Failed", "ValidationFailed", "Canceled"):
            print(json.dumps(doc, indent=1), file=sys.stderr)
            sys.exit(1)
        try:
            ok = eval(cond)
        except (KeyError, TypeError, AttributeError):
            ok = False
        if ok:
            print(f"{time.monotonic() - start:.3f}")
            sys.exit(0)
    if time.monotonic() - start > timeout:
        print("timeout; last /status:", json.dumps(doc, indent=1), file=sys.stderr)
        sys.exit(1)
    time.sleep(0.05)
