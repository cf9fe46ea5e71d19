#!/usr/bin/env python3
"""Draws an autoscaling timeline (CSV: t,depth,desired,alive, as the autoscale test
writes it with HAUL_TEST_TIMELINE=<file>) as an SVG: the chunk queue's depth (ready and
unacknowledged tasks, what KEDA reads) on the left axis, the workers asked for and the
worker processes alive on the right one. Standard library only.

    python3 bench/plot_timeline.py timeline.csv > bench/autoscale-timeline.svg
"""

import csv
import sys

W, H = 800, 360
LEFT, RIGHT, TOP, BOTTOM = 60, 60, 64, 50


def main() -> None:
    rows = list(csv.DictReader(open(sys.argv[1])))
    t = [float(r["t"]) for r in rows]
    depth = [int(r["depth"]) for r in rows]
    desired = [int(r["desired"]) for r in rows]
    alive = [int(r["alive"]) for r in rows]
    t_max = max(t) or 1.0
    d_max = max(max(depth), 1)
    w_max = max(max(alive), max(desired), 1)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(v: float) -> float:
        return LEFT + pw * v / t_max

    def yd(v: float) -> float:
        return TOP + ph * (1 - v / d_max)

    def yw(v: float) -> float:
        return TOP + ph * (1 - v / w_max)

    def steps(ys, scale) -> str:
        # a value holds until the next sample: draw steps, not slopes
        pts = []
        for i, (tv, yv) in enumerate(zip(t, ys)):
            if i:
                pts.append(f"{x(tv):.1f},{scale(ys[i - 1]):.1f}")
            pts.append(f"{x(tv):.1f},{scale(yv):.1f}")
        return " ".join(pts)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">'
        "Workers scaled on the chunk queue's depth (the KEDA contract, played by the test)</text>",
    ]
    # axes and grid
    for i in range(5):
        v = d_max * i / 4
        y = yd(v)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#1f77b4">{v:.0f}</text>')
    for w in range(w_max + 1):
        out.append(
            f'<text x="{W - RIGHT + 6}" y="{yw(w) + 4:.1f}" fill="#d62728">{w}</text>'
        )
    step = max(1, round(t_max / 10))
    s = 0
    while s <= t_max:
        out.append(f'<text x="{x(s):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{s}</text>')
        s += step
    out.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">seconds</text>')
    out.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>'
    )
    out.append(
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{steps(depth, yd)}"/>'
    )
    out.append(
        f'<polyline fill="none" stroke="#ff7f0e" stroke-width="2" stroke-dasharray="5,3" '
        f'points="{steps(desired, yw)}"/>'
    )
    out.append(
        f'<polyline fill="none" stroke="#d62728" stroke-width="2" points="{steps(alive, yw)}"/>'
    )
    legend = [
        ("#1f77b4", "", "queue depth (chunks; left axis)"),
        ("#ff7f0e", ' stroke-dasharray="5,3"', "workers asked for (right axis)"),
        ("#d62728", "", "worker processes alive (right axis)"),
    ]
    for i, (colour, dash, label) in enumerate(legend):
        lx = LEFT + i * 240
        out.append(
            f'<line x1="{lx}" y1="{TOP - 18}" x2="{lx + 24}" y2="{TOP - 18}" '
            f'stroke="{colour}" stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{lx + 30}" y="{TOP - 14}">{label}</text>')
    out.append("</svg>")
    print("\n".join(out))


if __name__ == "__main__":
    main()
