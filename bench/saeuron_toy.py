"""SAeUron on the toy model, before it is a method (issue 16): does editing SAE features of one block erase?

1. Train a batch-TopK SAE (erasure_core.sae) on output_blocks.1.1 (diffusers up_blocks.0.attentions.1, the
   toy's analogue of SD1.5's up_blocks.1.attentions.1), streamed over every cell's prompt (canonical and two
   synonyms) × --sae-seeds seeds × the sampler's steps, both CFG halves. Saved to --sae (reused when present).
2. Per target: feature means on the target's training prompt ("a circle") and on its named neighbours'
   training prompts plus the empty prompt, on seeds 5000+ (no evaluation seed); select per bucket.
3. Validation (what the settings may be chosen on): the training prompt on seeds 6000+ and the named
   neighbours' training prompts. Then protocol v2's held-out figures for the chosen settings (--final).

    python bench/saeuron_toy.py --targets stripes,circle
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from erasure_core.sae import (ConceptFeatures, FeatureMeans, SAETrainer, SparseAutoencoder, block_outputs, edit,
                              select_features)
from erasure_core.toy.evaluation import ErasureTarget, ProtocolCounts, evaluate_protocol
from erasure_core.toy.model import load_toy_model
from erasure_core.toy.world import OBJECT_NAMES, STYLE_NAMES, concept, prompt, training_prompt

RESULTS = Path(__file__).parent / "results"
STEPS, GUIDANCE = 10, 3.0


def block_of(model):
    return model.unet.up_blocks[0].attentions[1]


def train(model, seeds: int, batch: int, lr: float) -> tuple[SparseAutoencoder, dict]:
    prompts = [prompt(o, s, synonym=k) for o in range(len(OBJECT_NAMES)) for s in range(len(STYLE_NAMES))
               for k in range(3)]
    trainer = SAETrainer(dim=block_of(model).proj_out.weight.shape[0], batch=batch, lr=lr,
                         progress=lambda step, loss: print(f"sae step {step}: nmse {loss:.3f}", flush=True)
                         if step % 50 == 0 else None)
    start = time.time()
    with block_outputs(model.unet, block_of(model), lambda t, rows: trainer.feed(rows)):
        for seed in range(seeds):
            model.generate(prompts, [seed] * len(prompts), STEPS, GUIDANCE)
    sae = trainer.finish()
    return sae, {"seconds": round(time.time() - start, 1), "steps": trainer.steps, "prompts": len(prompts),
                 "seeds": seeds, "features": sae.features, "k": sae.k}


def means(model, sae, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    collect = FeatureMeans(sae)
    with block_outputs(model.unet, block_of(model), collect):
        model.generate([p for p in prompts for _ in seeds], seeds * len(prompts), STEPS, GUIDANCE)
    return collect.mean


def edited(model, sae: SparseAutoencoder, features: ConceptFeatures):
    """The block's output edited while this is active (both CFG halves, as the authors' hook)."""
    return block_outputs(model.unet, block_of(model), lambda t, rows: edit(sae, features, rows, t))


def validate(model, oracle, target: str, named: list[str]) -> dict:
    c = concept(target)
    axis = "object" if c.axis == "object" else "style"
    names = OBJECT_NAMES if axis == "object" else STYLE_NAMES
    seeds = list(range(6000, 6008))
    on = model.generate([training_prompt(target)] * len(seeds), seeds, STEPS, GUIDANCE)
    kept_prompts = [training_prompt(n) for n in named for _ in seeds[:4]]
    kept = model.generate(kept_prompts, seeds[:4] * len(named), STEPS, GUIDANCE)
    pred_on = oracle.predict(on)[axis]
    left = float((pred_on == names.index(target)).float().mean())
    hits = 0
    pred = oracle.predict(kept)
    for i, n in enumerate(n for n in named for _ in seeds[:4]):
        cn = concept(n)
        names_n = OBJECT_NAMES if cn.axis == "object" else STYLE_NAMES
        hits += int(pred[cn.axis][i] == names_n.index(n))
    return {"left": round(left, 3), "neighbours_kept": round(hits / len(kept_prompts), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="stripes,circle")
    parser.add_argument("--sae", default="runs/saeuron/toy-sae.pt")
    parser.add_argument("--sae-seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--per-bucket", default="4,16")
    parser.add_argument("--multipliers", default="-1,-5")
    parser.add_argument("--final", default="", help='target:per_bucket:multiplier,... to score on protocol v2')
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_toy_model()
    oracle = model.vocabulary.oracle()
    path = Path(args.sae)
    if path.exists():
        state = torch.load(path)
        sae, info = SparseAutoencoder(**state["sae"]), state["info"]
    else:
        with torch.enable_grad():
            sae, info = train(model, args.sae_seeds, args.batch, args.lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"sae": {**sae.tensors(), "k": sae.k, "threshold": sae.threshold}, "info": info}, path)
    print("sae", info, flush=True)
    out = {"sae": info, "validation": [], "protocol": []}
    finals = {t: (int(n), float(m)) for t, n, m in (f.split(":") for f in args.final.split(",") if f)}
    for target in args.targets.split(","):
        named = model.vocabulary.named_neighbours(target)
        mean_c = means(model, sae, [training_prompt(target)], list(range(5000, 5016)))
        mean_o = means(model, sae, [training_prompt(n) for n in named] + [""], list(range(5000, 5004)))
        out["validation"].append({"target": target, "settings": "unedited", **validate(model, oracle, target, named)})
        print(out["validation"][-1], flush=True)
        for n in map(int, args.per_bucket.split(",")):
            for mult in map(float, args.multipliers.split(",")):
                with edited(model, sae, select_features(mean_c, mean_o, n, mult)):
                    row = {"target": target, "per_bucket": n, "multiplier": mult,
                           **validate(model, oracle, target, named)}
                out["validation"].append(row)
                print(row, flush=True)
        if target in finals:
            n, mult = finals[target]
            erasure = ErasureTarget.from_names(target)
            base = {}
            evaluate_protocol(model, [], oracle, erasure, named, ProtocolCounts(), 10, base=base)
            with edited(model, sae, select_features(mean_c, mean_o, n, mult)):
                report = evaluate_protocol(model, [], oracle, erasure, named, ProtocolCounts(), 10, base=base)
            report.pop("images", None)
            out["protocol"].append({"target": target, "per_bucket": n, "multiplier": mult, **report})
            print({k: report[k] for k in ("ua", "ira_heldout", "cra_heldout", "fd")}, flush=True)
    (RESULTS / "saeuron_toy.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
