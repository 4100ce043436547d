"""The measurements that chose the defaults: train one configuration on the toy model, judge it, append a line.

Each argument is a JSON object of TrainConfig fields plus "target" (and optionally "alternative",
"preserve": "auto" for every other concept of the toy world). The base model's images are generated once per target
and kept in --base-dir, so runs differ only in the method. Results go to bench/results/tuning.jsonl.

    python bench/tune.py '{"target": "circle", "method": "memory", "projections": "kv", "preserve": "auto"}'
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

import torch

from erasure_core.toy.vocabulary import ToyVocabulary
from erasure_core.engine import TrainConfig
from erasure_core.toy.evaluation import ErasureTarget, evaluate_erasure
from erasure_core.methods import train_patch
from erasure_core.toy.classifier import load_oracle
from erasure_core.toy.model import load_toy_model
from erasure_core.toy.world import training_prompt

RESULTS = Path(__file__).parent / "results"


def run(spec: dict, model, oracle, base_dir: Path) -> dict:
    spec = dict(spec)
    target, alternative = spec.pop("target"), spec.pop("alternative", "")
    preserve = spec.pop("preserve", "")
    kept = ToyVocabulary().default_preserve(target) if preserve == "auto" else [p for p in preserve.split(",") if p]
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(spec) - known
    if unknown:
        raise SystemExit(f"unknown TrainConfig fields: {sorted(unknown)}")
    config = TrainConfig(concept=training_prompt(target), alternative=training_prompt(alternative) if alternative
                         else "", preserve=[training_prompt(k) for k in kept], **spec)
    result = train_patch(model, config)
    base_file = base_dir / f"base-{target}.pt"
    base = torch.load(base_file) if base_file.exists() else {}
    report, _ = evaluate_erasure(model, [(result.patch, 1.0)], oracle, ErasureTarget.from_names(target, alternative),
                                 seeds_per_cell=1, steps=20, base=base)
    if not base_file.exists():
        torch.save(base, base_file)
    metrics = {k: None if report[k] is None else round(report[k], 4)
               for k in ("ua", "ua_syn", "ira", "cra", "alt", "fd", "drift", "layout_ssim")}
    return {"target": target, "alternative": alternative or None, "preserve": preserve or None,
            **{k: v for k, v in spec.items()}, **metrics, "train_seconds": round(result.seconds, 1),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="JSON objects, one per run")
    parser.add_argument("--out", default=str(RESULTS / "tuning.jsonl"))
    parser.add_argument("--base-dir", default="runs/tune")
    args = parser.parse_args()
    base_dir = Path(args.base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    model, oracle = load_toy_model(), load_oracle()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for spec in args.specs:
        line = run(json.loads(spec), model, oracle, base_dir)
        print(json.dumps(line), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
