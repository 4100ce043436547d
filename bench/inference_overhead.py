"""What a patch costs at generation time on the toy model: wall time of the same generations with the patch
attached over without it, interleaved (plain, patched, plain, ...) so that other load on the machine hits both.

    python bench/inference_overhead.py            # writes bench/results/inference_overhead.json

Patches: SAeUron on stripes (the toy's shipped SAE; an SAE encode and decode of one block per UNet call) and,
for comparison, concept memory (8 tokens appended in every attn2 layer) and UCE (deltas added by hooks).
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from erasure_core.denoiser import patched
from erasure_core.engine import TrainConfig
from erasure_core.methods import train_patch
from erasure_core.toy.model import load_toy_model

RESULTS = Path(__file__).parent / "results"
PROMPTS, STEPS, ROUNDS = 16, 10, 5


def main() -> None:
    torch.manual_seed(0)
    model = load_toy_model()
    quick = dict(steps=20, batch=4, cache_seeds=2, cache_steps=10)
    patches = {"saeuron": train_patch(model, TrainConfig(concept="a shape with stripes", method="saeuron",
                                                         cache_steps=10)).patch,
               "memory": train_patch(model, TrainConfig(concept="a shape with stripes", **quick)).patch,
               "uce": train_patch(model, TrainConfig(concept="a shape with stripes", method="uce")).patch}
    prompts, seeds = ["a circle with stripes"] * PROMPTS, list(range(PROMPTS))
    times: dict[str, list[float]] = {"plain": [], **{name: [] for name in patches}}
    with torch.no_grad():
        model.generate(prompts[:2], seeds[:2], steps=2)  # warm-up
        for _ in range(ROUNDS):
            for name in times:
                start = time.perf_counter()
                with patched(model, [(patches[name], 1.0)] if name in patches else []):
                    model.generate(prompts, seeds, steps=STEPS)
                times[name].append(time.perf_counter() - start)
    plain = sorted(times["plain"])[ROUNDS // 2]
    report = {"what": f"{PROMPTS} toy images x {STEPS} DDIM steps, median of {ROUNDS} interleaved rounds",
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads, CPU",
              "plain_seconds": round(plain, 3),
              "ratio": {name: round(sorted(times[name])[ROUNDS // 2] / plain, 3) for name in patches},
              "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()}}
    (RESULTS / "inference_overhead.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
