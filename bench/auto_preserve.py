"""Does `--preserve auto` on a model without a vocabulary help? On the toy world with its vocabulary hidden, each
method is trained twice per target: preserving nothing, and preserving the 8 nearest concepts of the shipped word
list (erasure_core.candidates, as `auto` does on a checkpoint). Both are scored on the same held-out concepts:
every other concept of the world, whose names and synonyms the word search may not pick (so nothing scored was
preserved). Protocol v2's counts and seeds, as the benchmark. Resumable: finished entries are kept.

    python bench/auto_preserve.py [--methods uce,esd-x] [--targets circle,star,stripes,dots]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from erasure_core.candidates import nearest_concepts
from erasure_core.engine import TrainConfig
from erasure_core.methods import train_patch
from erasure_core.request import AUTO_PRESERVE
from erasure_core.toy.evaluation import ErasureTarget, ProtocolCounts, evaluate_protocol
from erasure_core.toy.model import load_toy_model
from erasure_core.toy.world import OBJECT_NAMES, STYLE_NAMES, concept, training_prompt

OUT = Path(__file__).parent / "results" / "auto_preserve.json"
MODES = ("none", "words")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="uce,esd-x")
    parser.add_argument("--targets", default="circle,star,stripes,dots")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_toy_model()
    oracle = model.vocabulary.oracle()
    counts, steps = ProtocolCounts(), 10
    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    for target in args.targets.split(","):
        others = [n for n in (*OBJECT_NAMES, *STYLE_NAMES) if n != target]
        banned = [noun for n in others for noun in concept(n).nouns]
        words = nearest_concepts(model, training_prompt(target), AUTO_PRESERVE, exclude=banned)
        base: dict = {}
        for method in args.methods.split(","):
            for mode in MODES:
                if any(r["target"] == target and r["method"] == method and r["preserve"] == mode
                       for r in results["rows"]):
                    continue
                print(f"{target}: {method}, preserve {mode}", flush=True)
                config = replace(TrainConfig(concept=training_prompt(target), method=method),
                                 preserve=words if mode == "words" else [])
                start = time.time()
                patch = train_patch(model, config).patch
                seconds = time.time() - start
                report = evaluate_protocol(model, [(patch, 1.0)], oracle, ErasureTarget.from_names(target, ""), [],
                                           counts, steps, base=base)
                results["rows"].append({
                    "target": target, "method": method, "preserve": mode,
                    "preserved_words": config.preserve, "train_seconds": round(seconds, 1),
                    **{k: report[k] for k in ("ua", "ira_heldout", "cra_heldout", "fd")},
                    "base": {k: report["base"][k] for k in ("ira_heldout", "cra_heldout")}})
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results["rows"]))


def summary(rows: list[dict]) -> str:
    lines = ["| target | method | preserve | UA | held-out IRA | held-out CRA | words |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['method']} | {r['preserve']} | {r['ua']['rate']:.2f} | "
                     f"{r['ira_heldout']['rate']:.2f} | {r['cra_heldout']['rate']:.2f} | "
                     f"{', '.join(r['preserved_words'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
