"""Cached frozen trajectories against ESD's re-sampling loop: wall time and UA, measured in one run.

Both train ESD-x on the toy model with the same seed, steps and learning rate; the only difference is where
x_t comes from. The cached run samples 8 trajectories once and draws from them; the re-sampling run samples
afresh at every step. Wall time includes building the cache. Writes bench/results/cache_vs_resample.json.

    python bench/cache_vs_resample.py [--target circle] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from erasure_core.engine import ResamplingSource, TrainConfig, concept_cache
from erasure_core.toy.evaluation import ErasureTarget, evaluate_erasure
from erasure_core.methods.esd import train_esd
from erasure_core.toy.classifier import load_oracle
from erasure_core.toy.model import load_toy_model
from erasure_core.toy.world import training_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="circle")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_vs_resample.json"))
    args = parser.parse_args()
    model, oracle = load_toy_model(), load_oracle()
    config = TrainConfig(concept=training_prompt(args.target), method="esd-x", steps=args.steps)
    concept, empty = model.encode([config.concept]), model.encode([""])
    target = ErasureTarget.from_names(args.target)
    runs, base = {}, {}
    for name in ("cached", "resampling"):
        start = time.time()
        source = concept_cache(model, config, concept, empty) if name == "cached" else \
            ResamplingSource(model, concept, empty, config.cache_steps, config.cache_guidance)
        patch, losses = train_esd(model, config, cache=source)
        seconds = time.time() - start
        report, _ = evaluate_erasure(model, [(patch, 1.0)], oracle, target, seeds_per_cell=1, steps=20, base=base)
        runs[name] = {"train_seconds": round(seconds, 1), "ua": report["ua"], "ua_syn": report["ua_syn"],
                      "ira": report["ira"], "cra": report["cra"], "final_loss": sum(losses[-20:]) / 20}
        print(name, runs[name], flush=True)
    result = {"target": args.target, "method": "esd-x", "steps": args.steps, "batch": config.batch,
              "cache_seeds": config.cache_seeds, "sampler_steps": config.cache_steps,
              "torch_threads": torch.get_num_threads(), "runs": runs,
              "speedup": round(runs["resampling"]["train_seconds"] / runs["cached"]["train_seconds"], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"cached is {result['speedup']}x faster; UA cached {runs['cached']['ua']:.3f} vs re-sampling "
          f"{runs['resampling']['ua']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
