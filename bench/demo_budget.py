"""Choose the demo's budget by measurement: run `erasure demo --budget NAME` as a user would (a fresh process, timed
from start to exit), then score the patch it wrote on the whole grid (1 seed per cell, 20 DDIM steps, not timed),
so that a cheaper budget's cost in quality shows beside its time.

    python bench/demo_budget.py [--budgets quick,full] [--concepts circle,stripes,star,dots]
                                [--out bench/results/demo_budget.md]

The demo's budgets are erasure_core.toy.demo.BUDGETS. "quick" was chosen on "circle", the demo's concept; the
other concepts are the check that it holds elsewhere."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from erasure_core.patch import load_patch
from erasure_core.toy.evaluation import ErasureTarget, evaluate_erasure
from erasure_core.toy.model import load_toy_model

METRICS = ("ua", "ua_syn", "ira", "cra", "alt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/demo_budget.md")
    parser.add_argument("--concepts", default="circle", help="comma-separated concepts")
    parser.add_argument("--budgets", default="quick", help="comma-separated names of erasure_core.toy.demo.BUDGETS")
    args = parser.parse_args()
    model = load_toy_model()
    oracle, bases, rows = model.vocabulary.oracle(), {}, []
    for concept in [c.strip() for c in args.concepts.split(",") if c.strip()]:
        for budget in [b.strip() for b in args.budgets.split(",") if b.strip()]:
            with tempfile.TemporaryDirectory() as folder:
                start = time.time()
                subprocess.run([sys.executable, "-m", "erasure_core", "demo", "--budget", budget, "--concept", concept,
                                "--out-dir", folder], check=True, stdout=subprocess.DEVNULL)
                seconds = round(time.time() - start, 1)
                report = json.loads((Path(folder) / "metrics.json").read_text())
                patch = load_patch(report["patch"])
            target = ErasureTarget.from_names(concept, report["alternative"] or "")
            full, _ = evaluate_erasure(model, [(patch, 1.0)], oracle, target, seeds_per_cell=1, steps=20,
                                       guidance=model.default_guidance, base=bases.setdefault(concept, {}))
            rows.append({"concept": concept, "alternative": report["alternative"], "budget": budget,
                         "seconds": seconds, "phases": report["seconds"], "images": report["image_counts"],
                         "demo": {k: report[k] for k in METRICS}, "demo_base": {k: report["base"][k] for k in METRICS},
                         "full": {k: full[k] for k in METRICS}, "full_base": {k: full["base"][k] for k in METRICS}})
            print(json.dumps(rows[-1]), flush=True)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["`erasure demo --budget B --concept C` timed as a fresh process (start to exit, Python start-up and "
             "model loading included). `demo` columns: what the demo printed; `full` columns: the same patch on the "
             "whole grid, 1 seed per cell, 20 DDIM steps (not timed). Base model in brackets.", "",
             "| concept | budget | wall s | train s | evaluate s | images (target+syn+other) | demo UA "
             "| demo IRA (base) | demo CRA (base) | full UA | full UA-syn | full IRA (base) | full CRA (base) "
             "| full ALT |",
             "|" + "---|" * 14]
    for r in rows:
        p, i, d, db, f, fb = r["phases"], r["images"], r["demo"], r["demo_base"], r["full"], r["full_base"]
        name = r["concept"] + (f" → {r['alternative']}" if r["alternative"] else "")
        lines.append(f"| {name} | {r['budget']} | {r['seconds']} | {p['train']} | {p['evaluate']} | "
                     f"{i['target']}+{i['synonym']}+{i['other']} | {fmt(d['ua'])} | {fmt(d['ira'])} ({fmt(db['ira'])}) "
                     f"| {fmt(d['cra'])} ({fmt(db['cra'])}) | {fmt(f['ua'])} | {fmt(f['ua_syn'])} | "
                     f"{fmt(f['ira'])} ({fmt(fb['ira'])}) | {fmt(f['cra'])} ({fmt(fb['cra'])}) | {fmt(f['alt'])} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
