"""Draw UA against patch strength from a benchmark run: one panel per target, one line per method (named
preservation), as measured by `erasure bench` (`ua_by_strength` in each row).

    python bench/strength_figure.py [--bench bench/results/v2/bench.json] [--out bench/results/v2/ua_by_strength.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PANEL, MARGIN, LEGEND = (300, 220), 40, 170
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#aa3377", "#66ccee", "#228833"]


def draw(rows: list[dict], out: Path) -> None:
    rows = [r for r in rows if r["preserve"] == "named" and "ua_by_strength" in r]
    if not rows:
        raise SystemExit("no row has ua_by_strength yet: run `erasure bench` first")
    targets = list(dict.fromkeys(r["target"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width, height = MARGIN + len(targets) * (PANEL[0] + MARGIN) + LEGEND, PANEL[1] + 2 * MARGIN + 20
    image = Image.new("RGB", (width, height), "white")
    pen, font = ImageDraw.Draw(image), ImageFont.load_default()
    strengths = sorted(float(s) for s in rows[0]["ua_by_strength"])
    top = max(strengths)
    for t, target in enumerate(targets):
        x0, y0 = MARGIN + t * (PANEL[0] + MARGIN), MARGIN
        pen.rectangle([x0, y0, x0 + PANEL[0], y0 + PANEL[1]], outline="black")
        pen.text((x0 + 4, y0 - 16), f"UA, erasing {target}", fill="black", font=font)
        at = lambda s, ua: (x0 + s / top * PANEL[0], y0 + (1 - ua) * PANEL[1])  # noqa: E731
        for s in strengths:
            pen.line([at(s, 0), (at(s, 0)[0], at(s, 0)[1] + 4)], fill="black")
            pen.text((at(s, 0)[0] - 8, y0 + PANEL[1] + 6), f"{s:g}", fill="black", font=font)
        for ua in (0.0, 0.5, 1.0):
            pen.line([at(0, ua), at(top, ua)], fill="#dddddd")
            pen.text((x0 - 26, at(0, ua)[1] - 6), f"{ua:.1f}", fill="black", font=font)
        for m, method in enumerate(methods):
            row = next((r for r in rows if r["target"] == target and r["method"] == method), None)
            if row is None:
                continue
            points = [at(s, row["ua_by_strength"][k]["rate"]) for s, k in
                      sorted((float(k), k) for k in row["ua_by_strength"])]
            pen.line(points, fill=COLOURS[m % len(COLOURS)], width=2)
        pen.text((x0 + PANEL[0] / 2 - 20, y0 + PANEL[1] + 20), "strength", fill="black", font=font)
    for m, method in enumerate(methods):
        x, y = width - LEGEND + 10, MARGIN + 14 * m
        pen.line([(x, y + 6), (x + 20, y + 6)], fill=COLOURS[m % len(COLOURS)], width=3)
        pen.text((x + 26, y), method, fill="black", font=font)
    image.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="bench/results/v2/bench.json")
    ap.add_argument("--out", default="bench/results/v2/ua_by_strength.png")
    args = ap.parse_args()
    draw(json.loads(Path(args.bench).read_text())["rows"], Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
