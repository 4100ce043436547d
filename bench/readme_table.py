"""Put the v2 benchmark's table into the README, between its `<!-- bench-table -->` markers, from
bench/results/v2/bench.json, with a status line saying how much of the full run it holds.

    python bench/readme_table.py
"""
from __future__ import annotations

import json
from pathlib import Path

from erasure_core.methods import method_names
from erasure_core.toy.benchmark import markdown

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("circle", "stripes", "star", "dots")
START, END = "<!-- bench-table -->", "<!-- /bench-table -->"


def status(results: dict) -> str:
    rows = results["rows"]
    modes = results["settings"]["preserve_modes"]
    total = len(TARGETS) * len(method_names()) * len(modes)
    done = [f"{t} ({m})" for m in modes for t in TARGETS if any(r["target"] == t and r["preserve"] == m for r in rows)]
    attacked = sum(1 for r in rows if r.get("attacks"))
    head = "Full run" if len(rows) == total else f"Run in progress: {len(rows)} of {total} rows measured so far"
    return (f"*{head} ({', '.join(done)}; {attacked} attacked), {len(results['stacked'])} stacked pair(s), 2 CPU "
            "cores, `erasure bench --attacks` (all defaults), resumed with the same command and seeds; "
            "`bench/results/v2/bench.json` and `bench.md`. Train seconds marked ‡ were measured while other work "
            "shared the cores.*")


def main() -> None:
    results = json.loads((ROOT / "bench/results/v2/bench.json").read_text())
    readme = (ROOT / "README.md").read_text()
    before, rest = readme.split(START, 1)
    _, after = rest.split(END, 1)
    table = f"{START}\n{status(results)}\n\n{markdown(results).strip()}\n{END}"
    (ROOT / "README.md").write_text(before + table + after)


if __name__ == "__main__":
    main()
