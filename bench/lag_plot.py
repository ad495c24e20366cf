#!/usr/bin/env python3
"""Draw replication lag over a migration and cutover as an SVG (standard
library only).

    lag_plot.py LAG.csv OUT.svg [TITLE]

LAG.csv is what bench/lag_record.py writes (t, state, substate, lag_bytes,
lag_seconds, ..., cutover_outcome, pause_seconds). The phases (copy,
streaming, cutover, done) are shaded; lag bytes are the line, lag seconds a
second dashed line on the right axis; the cutover's write pause is marked.
"""
import csv
import math
import sys
from xml.sax.saxutils import escape

src, out = sys.argv[1], sys.argv[2]
title = sys.argv[3] if len(sys.argv) > 3 else "pgshift: replication lag through a migration and cutover"
rows = list(csv.DictReader(open(src)))
if not rows:
    sys.exit(f"{src}: no samples")


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def phase(r):
    sub, st = r["substate"], r["state"]
    if st == "Succeeded":
        return "done"
    if sub == "CompletingMigration" or "Cutover" in sub and sub != "WaitingForCutoverTrigger":
        return "cutover"
    if sub == "WaitingForCutoverTrigger":
        return "streaming"
    return "copy"


ts = [float(r["t"]) for r in rows]
lag_mb = [(num(r["lag_bytes"]) or 0) / 1048576 for r in rows]
lag_s = [num(r["lag_seconds"]) or 0 for r in rows]

# Until its first lag refresh after streaming starts, /status reports the lag
# against LSN 0 (the whole WAL position, a known pgshift quirk). Such a
# leading reading (unchanged, lag_seconds 0, then a value ten times smaller)
# is not a measurement: it is left out of the scale and drawn as a gap.
stale = set()
first = next((i for i, r in enumerate(rows) if num(r["lag_bytes"]) is not None), None)
if first is not None and lag_s[first] == 0:
    j = first
    while j < len(rows) and lag_mb[j] == lag_mb[first] and lag_s[j] == 0:
        j += 1
    if j < len(rows) and lag_mb[j] * 10 < lag_mb[first]:
        stale = set(range(first, j))
for i in stale:
    lag_mb[i] = 0.0
t0, t1 = ts[0], max(ts[-1], ts[0] + 1)
ymax = max(max(lag_mb) * 1.15, 0.1)
smax = max(max(lag_s) * 1.15, 0.1)

W, H, L, R, T, B = 900, 380, 70, 70, 50, 60
pw, ph = W - L - R, H - T - B


def x(t):
    return L + (t - t0) / (t1 - t0) * pw


def y(v, top):
    return T + ph - v / top * ph


def nice_ticks(top, n=5):
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(top / step + 1e-9) + 1)]


svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
       f'font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']

# Phase bands.
colors = {"copy": "#fde9c8", "streaming": "#dcecf9", "cutover": "#f9d0d0", "done": "#dff3dc"}
start, cur = ts[0], phase(rows[0])
bands = []
for r, t in zip(rows[1:], ts[1:]):
    p = phase(r)
    if p != cur:
        bands.append((cur, start, t))
        start, cur = t, p
bands.append((cur, start, ts[-1]))
for p, a, b in bands:
    svg.append(f'<rect x="{x(a):.1f}" y="{T}" width="{max(x(b) - x(a), 1):.1f}" height="{ph}" '
               f'fill="{colors[p]}"/>')
    if x(b) - x(a) > 40:
        svg.append(f'<text x="{(x(a) + x(b)) / 2:.1f}" y="{T + 14}" text-anchor="middle" '
                   f'fill="#555">{p}</text>')

# Axes and grid.
for v in nice_ticks(ymax):
    svg.append(f'<line x1="{L}" x2="{L + pw}" y1="{y(v, ymax):.1f}" y2="{y(v, ymax):.1f}" stroke="#ccc" stroke-width="0.5"/>')
    svg.append(f'<text x="{L - 6}" y="{y(v, ymax) + 4:.1f}" text-anchor="end">{v:g}</text>')
for v in nice_ticks(smax):
    svg.append(f'<text x="{L + pw + 6}" y="{y(v, smax) + 4:.1f}" fill="#b5651d">{v:g}</text>')
for v in nice_ticks(t1 - t0, 10):
    svg.append(f'<line x1="{x(t0 + v):.1f}" x2="{x(t0 + v):.1f}" y1="{T + ph}" y2="{T + ph + 4}" stroke="black"/>')
    svg.append(f'<text x="{x(t0 + v):.1f}" y="{T + ph + 18}" text-anchor="middle">{v:g}</text>')
svg.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
svg.append(f'<text x="{L + pw / 2}" y="{H - 18}" text-anchor="middle">seconds since pgshift run started</text>')
svg.append(f'<text transform="translate(18,{T + ph / 2}) rotate(-90)" text-anchor="middle">lag (MB)</text>')
svg.append(f'<text transform="translate({W - 14},{T + ph / 2}) rotate(90)" text-anchor="middle" '
           f'fill="#b5651d">lag (seconds)</text>')

# Lines.
def segments(values, top):
    """Polylines over the measured samples (before the first one and the
    stale leading reading are gaps)."""
    seg = []
    for i, (t, v) in enumerate(zip(ts, values)):
        if i in stale or num(rows[i]["lag_bytes"]) is None:
            if len(seg) > 1:
                yield seg
            seg = []
            continue
        seg.append(f"{x(t):.1f},{y(v, top):.1f}")
    if len(seg) > 1:
        yield seg


for seg in segments(lag_mb, ymax):
    svg.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="#1f5fa8" stroke-width="1.8"/>')
for seg in segments(lag_s, smax):
    svg.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="#b5651d" stroke-width="1.2" '
               f'stroke-dasharray="4,3"/>')
if stale:
    a = ts[min(stale)]
    svg.append(f'<text x="{x(a) + 4:.1f}" y="{T + ph - 50}" fill="#555" font-size="10">'
               f'first lag refresh pending</text>')

# The cutover's pause, once known.
pause = next((num(r["pause_seconds"]) for r in reversed(rows) if num(r["pause_seconds"])), None)
cut = next((t for r, t in zip(rows, ts) if phase(r) in ("cutover", "done")), None)
if cut is not None:
    svg.append(f'<line x1="{x(cut):.1f}" x2="{x(cut):.1f}" y1="{T}" y2="{T + ph}" stroke="#c00" stroke-width="1.5"/>')
    label = "cutover" + (f": write pause {pause * 1000:.0f} ms" if pause else "")
    svg.append(f'<text x="{x(cut) - 6:.1f}" y="{T + 32}" text-anchor="end" fill="#c00">{escape(label)}</text>')

# Legend.
svg.append(f'<line x1="{L + 10}" x2="{L + 34}" y1="{T + ph - 30}" y2="{T + ph - 30}" stroke="#1f5fa8" stroke-width="2"/>'
           f'<text x="{L + 40}" y="{T + ph - 26}">lag bytes (left)</text>')
svg.append(f'<line x1="{L + 10}" x2="{L + 34}" y1="{T + ph - 14}" y2="{T + ph - 14}" stroke="#b5651d" stroke-dasharray="4,3"/>'
           f'<text x="{L + 40}" y="{T + ph - 10}">lag seconds (right)</text>')
svg.append("</svg>")
open(out, "w").write("\n".join(svg) + "\n")
print(f"{out}: {len(rows)} samples over {t1 - t0:.1f}s")
