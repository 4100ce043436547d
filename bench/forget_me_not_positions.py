"""Forget-Me-Not on the toy model: which context positions the attention loss must cover.

The authors' loss reads the attention at the concept's own tokens. A causal text encoder also writes the prompt
into EOS and the padding after it, so this trains the method both ways (the concept's words alone, and the words
with every position after them, the method's choice) and counts, on seeds no training saw, how often the oracle
still finds the concept and how many other prompts keep theirs.

    python bench/forget_me_not_positions.py [--steps 35] [--lr 5e-3]

Writes bench/results/forget_me_not.{json,md}."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

from erasure_core.attention_maps import cross_attention_maps, word_positions
from erasure_core.denoiser import patched
from erasure_core.engine import TrainConfig
from erasure_core.methods import forget_me_not, train_patch
from erasure_core.toy.classifier import load_oracle
from erasure_core.toy.model import load_toy_model
from erasure_core.toy.world import OBJECT_NAMES, STYLE_NAMES, concept, training_prompt

SEEDS = list(range(100, 108))     # the trajectory cache uses seeds 0-7
OTHERS = {"circle": ["a square", "a triangle", "a star"], "stripes": ["a shape with dots", "a shape with grid"]}
OUT = Path(__file__).parent / "results"


def shown(model, oracle, prompts, seeds, patches, name) -> list[bool]:
    """For each (prompt, seed): does the oracle see the concept `name`?"""
    with patched(model, patches):
        images = model.generate(prompts, seeds, steps=10, guidance=3.0)
    out = oracle.predict(images)
    axis = concept(name).axis
    names = OBJECT_NAMES if axis == "object" else STYLE_NAMES
    return [names[i] == name for i in out[axis]]


def mass(model, prompt, positions, patches):
    cond = model.encode([prompt] * len(SEEDS))
    x = torch.randn(len(SEEDS), *model.sample_shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), patched(model, patches), \
            cross_attention_maps(model.cross_attention_modules(), positions) as maps:
        model.predict_noise(x, torch.full((len(SEEDS),), 500), cond)
    return round(float(forget_me_not.attention_mass(maps)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, oracle = load_toy_model(), load_oracle()
    rows = []
    words_only = lambda denoiser, prompt, length: word_positions(denoiser.prompt_length, prompt,  # noqa: E731
                                                                 forget_me_not.FRAME_WORDS)
    for target in OTHERS:
        prompt = training_prompt(target)
        for variant, positions_of in (("concept words only (the authors')", words_only),
                                      ("words and every position after (ours)", forget_me_not.concept_positions)):
            with mock.patch.object(forget_me_not, "concept_positions", positions_of):
                result = train_patch(model, TrainConfig(concept=prompt, method="forget-me-not", steps=args.steps,
                                                        lr=args.lr))
            patch = result.patch
            positions = patch.training["forget_me_not"]["positions"]
            left = shown(model, oracle, [prompt] * len(SEEDS), SEEDS, [(patch, 1.0)], target)
            kept = []
            for other in OTHERS[target]:
                name = other.split()[-1]
                kept += shown(model, oracle, [other] * 4, SEEDS[:4], [(patch, 1.0)], name)
            rows.append({"target": target, "positions": variant, "read_at": positions,
                         "attention_before": mass(model, prompt, positions, []),
                         "attention_after": mass(model, prompt, positions, [(patch, 1.0)]),
                         "concept_left": f"{sum(left)}/{len(left)}", "others_kept": f"{sum(kept)}/{len(kept)}",
                         "base_concept": f"{sum(shown(model, oracle, [prompt] * len(SEEDS), SEEDS, [], target))}"
                                         f"/{len(SEEDS)}"})
            print(rows[-1], flush=True)
    settings = {"steps": args.steps, "lr": args.lr, "seeds": SEEDS, "sample_steps": 10, "guidance": 3.0}
    OUT.mkdir(exist_ok=True)
    (OUT / "forget_me_not.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = [f"# Forget-Me-Not: where the attention loss reads ({args.steps} steps, lr {args.lr}, toy model)", "",
             "`python bench/forget_me_not_positions.py`. Seeds 100-107 (the training cache uses 0-7); other "
             "prompts on seeds 100-103. Attention: ‖p‖/√n at the positions read, x_t noise at t = 500. "
             "No preservation list. The positions were chosen on circle (seeds 100-105, tests/test_methods.py); "
             "stripes is the check on a concept the choice never saw.", "",
             "| target | positions read | attention before → after | concept left | base | others kept |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['positions']} {r['read_at']} | {r['attention_before']} → "
              f"{r['attention_after']} | {r['concept_left']} | {r['base_concept']} | {r['others_kept']} |"
              for r in rows]
    (OUT / "forget_me_not.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
