"""Choose the demo's budget by measurement: run `erasure demo`'s job (erasure_core.toy.demo.run_demo) under several
training and sampling budgets in one process, each timed from model load to metrics, and write a table.

    python bench/demo_budget.py --out bench/results/demo_budget.md [--concept circle]

Each variant's wall time includes loading the toy model and the oracle, as `erasure demo` does (the CLI adds
about 2 s of Python start-up)."""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from erasure_core.request import TrainRequest
from erasure_core.toy.demo import demo_alternative, run_demo
from erasure_core.toy.model import load_toy_model

VARIANTS = {  # name: (training request fields, sample_steps)
    "full": (dict(steps=200), 20),  # the library's defaults: 200 steps, cache 8 x 25, batch 8; 20 DDIM steps
    "s60-c4x10-d10": (dict(steps=60, cache_seeds=4, cache_steps=10), 10),
    "s100-b4-c4x10-d10": (dict(steps=100, batch=4, cache_seeds=4, cache_steps=10), 10),
    "s40-b4-c4x10-d10": (dict(steps=40, batch=4, cache_seeds=4, cache_steps=10), 10),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/demo_budget.md")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    args = parser.parse_args()
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        fields, sample_steps = VARIANTS[name]
        start = time.time()
        model = load_toy_model()
        request = TrainRequest(concept=args.concept, alternative=demo_alternative(model, args.concept, "memory"),
                               **fields)
        with tempfile.TemporaryDirectory() as folder:
            report = run_demo(model, Path(folder), request, sample_steps=sample_steps, log=lambda _: None)
        rows.append({"variant": name, "seconds": round(time.time() - start, 1), "phases": report["seconds"],
                     **{k: report[k] for k in ("ua", "ua_syn", "ira", "cra", "alt")},
                     "base": {k: report["base"][k] for k in ("ua", "ira", "cra")}})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"Demo budgets for erasing '{args.concept}' (memory, default alternative and preservation), "
             f"{torch.get_num_threads()} torch threads, one process:", "",
             "| variant | wall s | train s | grid s | evaluate s | UA | UA-syn | IRA (base) | CRA (base) | ALT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, b = r["phases"], r["base"]
        lines.append(f"| {r['variant']} | {r['seconds']} | {p['train']} | {p['grid']} | {p['evaluate']} | "
                     f"{r['ua']:.3f} | {r['ua_syn']:.3f} | {r['ira']:.3f} ({b['ira']:.3f}) | "
                     f"{r['cra']:.3f} ({b['cra']:.3f}) | {r['alt']:.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
