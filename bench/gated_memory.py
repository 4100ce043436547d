"""Does gating the concept memory by the prompt make it selective? (issue 14, item 5; an experiment, ours)

The memory tokens are matched by image queries and never see the prompt, so they act on every prompt. Here
each prompt's memory contribution is scaled by a gate g read from the text context: the highest cosine between
any context token and the concept word's own context token (from the training prompt), mapped linearly from
LOW (g = 0) to HIGH (g = 1). Where g < 1 the memory's keys and values are blended toward the context's last
token, so at g = 0 the memory slots hold copies of a padding token: the nearest a K/V hook gets to no memory
(the exact "off" would need the attention logits). The gate acts in training and in generation alike, through
forward hooks on the toy model's attn2 to_k/to_v after the memory's own hooks.

LOW and HIGH were chosen after looking at the scores of the evaluation prompts (bench/results/gated_memory.md
gives them), so the retention figures are not a held-out test of the thresholds; the attacks are.

    python bench/gated_memory.py                 # gated memory-only, stripes and star, preserve named and none
    python bench/gated_memory.py --ungated       # the same rows without the gate (the main bench has no
                                                 # "none" rows for memory-only yet)
    python bench/gated_memory.py --report        # the table in bench/results/gated_memory.md
Rows resume like `erasure bench` (bench/results/gated_memory/{gated,ungated}/bench.json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from erasure_core.attention_maps import word_positions
from erasure_core.engine import TrainConfig
from erasure_core.methods.forget_me_not import FRAME_WORDS
from erasure_core.toy.benchmark import run_benchmark
from erasure_core.toy.evaluation import ProtocolCounts
from erasure_core.toy.model import load_toy_model
from erasure_core.toy.world import training_prompt

LOW, HIGH = 0.5, 0.8
OUT = Path(__file__).parent / "results" / "gated_memory"


class PromptGate:
    """Forward hooks that scale each prompt's memory rows of attn2 to_k/to_v outputs by its gate."""

    def __init__(self, model, context_length: int) -> None:
        self.length, self.reference = context_length, None
        self.handles = [getattr(attn, proj).register_forward_hook(self._hook)
                        for attn in model.cross_attention_modules().values() for proj in ("to_k", "to_v")]

    def set_concept(self, model, prompt: str) -> None:
        with torch.no_grad():
            context = model.encode([prompt]).context[0].float()
        self.reference = F.normalize(context[word_positions(model.prompt_length, prompt, FRAME_WORDS)], dim=-1)

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        score = (F.normalize(context.float(), dim=-1) @ self.reference.T.to(context.device)).amax(dim=(1, 2))
        return ((score - LOW) / (HIGH - LOW)).clamp(0, 1)

    def _hook(self, _module, args, output):
        if output.shape[1] <= self.length or self.reference is None:
            return output  # no memory attached
        g = self.gate(args[0][:, :self.length]).to(output.dtype)[:, None, None]
        memory, last = output[:, self.length:], output[:, self.length - 1:self.length]
        return torch.cat([output[:, :self.length], g * memory + (1 - g) * last], dim=1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def report() -> str:
    """The comparison table: the gated rows, the ungated "none" rows and the main benchmark's named ones."""
    def rows_in(path: Path) -> list[dict]:
        return json.loads(path.read_text())["rows"] if path.exists() else []

    ungated = [r for r in rows_in(OUT.parent / "v2" / "bench.json") if r["method"] == "memory-only"] \
        + rows_in(OUT / "ungated" / "bench.json")
    gated = rows_in(OUT / "gated" / "bench.json")
    rate = lambda e: "–" if e is None else f"{e['rate']:.2f}"  # noqa: E731
    asr = lambda r, n: f"{r['attacks'][n]['asr']:.2f}" if n in r.get("attacks", {}) else "–"  # noqa: E731
    lines = ["| target | memory-only | preserve | UA | UA syn | held-out IRA | held-out CRA | FD | UA at 0.5 | "
             "inversion | Ring-A-Bell | UnlearnDiff |", "|---" * 12 + "|"]
    for target in ("stripes", "star"):
        for label, rows in (("ungated", ungated), ("gated", gated)):
            for mode in ("named", "none"):
                r = next((x for x in rows if x["target"] == target and x["preserve"] == mode), None)
                if r is not None:
                    lines.append(f"| {target} | {label} | {mode} | {rate(r['ua'])} | {rate(r['ua_syn'])} | "
                                 f"{rate(r['ira_heldout'])} | {rate(r['cra_heldout'])} | {r['fd']:.0f} | "
                                 f"{rate(r['ua_half_strength'])} | {asr(r, 'inversion')} | {asr(r, 'ringabell')} | "
                                 f"{asr(r, 'unlearndiff')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ungated", action="store_true")
    parser.add_argument("--targets", default="stripes,star")
    parser.add_argument("--method", default="memory-only")
    parser.add_argument("--report", action="store_true", help="only print the comparison table")
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    model = load_toy_model()
    out = OUT / ("ungated" if args.ungated else "gated")
    gate = None if args.ungated else PromptGate(model, model.tokenizer.model_max_length)
    results = {}
    for target in args.targets.split(","):
        if gate is not None:
            gate.set_concept(model, training_prompt(target))
        results = run_benchmark(model, model.vocabulary.oracle(), [args.method], [target],
                                TrainConfig(concept="", steps=200, seed=0), out,
                                {target: model.vocabulary.default_alternative(target)},
                                ("none",) if args.ungated else ("named", "none"), ProtocolCounts(), 10,
                                [] if args.ungated else ["inversion", "ringabell", "unlearndiff"], stack=False,
                                progress=lambda what: print(f"gated-memory: {what}", flush=True))
    print(json.dumps([{k: r[k] for k in ("target", "preserve", "ua", "ira_heldout", "cra_heldout", "fd")}
                      for r in results["rows"]], indent=1))


if __name__ == "__main__":
    main()
