"""How the toy model draws prompts with everyday words (toy/words.py): the templates the words' training never
used, the issue's two prompts, and words outside every list. 8 seeds per prompt, 10 DDIM steps, guidance 3.

    python bench/toy_words.py [--out bench/results/toy_words.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from erasure_core.toy.model import load_toy_model
from erasure_core.toy.words import HELD_OUT, check_prompts
from erasure_core.toy.world import OBJECT_NAMES, STYLE_NAMES, all_caption_words

UNLISTED = [("a qzx circle", "object", "circle"), ("a circle with a zebra", "object", "circle"),
            ("a star, trending on artstation", "object", "star"), ("dots everywhere", "style", "dots")]
ISSUE = [("a picture of stripes", "style", "stripes"), ("an image showing a circle", "object", "circle")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/toy_words.json")
    args = ap.parse_args()
    model = load_toy_model()
    oracle = model.vocabulary.oracle()
    seeds = list(range(8))

    def rate(prompt: str, axis: str, name: str) -> float:
        images = model.generate([prompt] * len(seeds), seeds, steps=10, guidance=3.0)
        names = OBJECT_NAMES if axis == "object" else STYLE_NAMES
        return round((oracle.predict(images)[axis] == names.index(name)).float().mean().item(), 4)

    held_out: dict[str, list] = {t: [] for t in HELD_OUT}
    for prompt, axis, name in check_prompts():
        template = next(t for t in HELD_OUT if t.split()[:2] == prompt.split()[:2])
        held_out[template].append({"prompt": prompt, "rate": rate(prompt, axis, name)})
    tok = model.tokenizer
    report = {
        "seeds": seeds, "steps": 10, "guidance": 3.0, "vocabulary": len(tok),
        "caption_words_in_trained_vocabulary": max(i for c in all_caption_words() for i in tok(c).input_ids) < 526,
        "held_out_templates": {t: {"mean": round(sum(e["rate"] for e in v) / len(v), 4), "prompts": v}
                               for t, v in held_out.items()},
        "issue_prompts": {p: rate(p, a, n) for p, a, n in ISSUE},
        "unlisted_words": {p: rate(p, a, n) for p, a, n in UNLISTED},
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "held_out_templates"}, indent=1))
    print({t: v["mean"] for t, v in report["held_out_templates"].items()})


if __name__ == "__main__":
    main()
