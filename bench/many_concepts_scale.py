"""How erasing many concepts in one patch scales, at SD1.5 dimensions with random weights (nothing downloaded).

    python bench/many_concepts_scale.py [--closed-form 1 10 100] [--trained 1 2 5 10] [--method esd-x]
                                        [--resolution 64] [--steps 2]

The model is bench/train_memory.py's: diffusers' SD1.5 UNet config (860M parameters) and a 12-layer, 768-wide CLIP
text encoder. The concepts are "a photo of <word>" for the first words of the shipped word list. For each count:
wall seconds and the rise of the resident set (CPU) or the allocator's peak (GPU) during train_patch.
- closed form (UCE, RECE): one solve for every concept's token rows;
- trained (`--method`): one trajectory cache per concept (`--cache-steps` DDIM steps of 1 seed each) and one
  shared loop of `--steps` steps at `--resolution` px; the slope per concept is fitted over the counts and
  extrapolated to 100 concepts.
Writes bench/results/many_concepts_scale.{json,md}."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_memory import build  # noqa: E402

from erasure_core.candidates import word_list  # noqa: E402
from erasure_core.engine import TrainConfig  # noqa: E402
from erasure_core.methods import train_patch  # noqa: E402
from erasure_core.toy.benchmark import PeakMemory  # noqa: E402

OUT = Path(__file__).parent / "results"


def measure(model, method: str, count: int, **settings) -> dict:
    prompts = [f"a photo of {w}" for w in word_list()[:count]]
    config = TrainConfig(concept=prompts[0], more_concepts=prompts[1:], method=method, **settings)
    start = time.time()
    with PeakMemory(model.device) as peak:
        result = train_patch(model, config)
    return {"method": method, "concepts": count, "seconds": round(time.time() - start, 2),
            "peak_rise_bytes": peak.peak_bytes, "cpu_share": round(peak.cpu_share, 2),
            "patch_concepts": len(result.patch.concepts)}


def slope(rows: list[dict], key: str) -> tuple[float, float]:
    """Least-squares line key = a + b * concepts over the rows: (a, b)."""
    x = torch.tensor([float(r["concepts"]) for r in rows])
    y = torch.tensor([float(r[key]) for r in rows])
    if len(rows) < 2:
        return float(y[0]), 0.0
    b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return float(y.mean()) - b * float(x.mean()), b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--closed-form", type=int, nargs="*", default=[1, 10, 100])
    parser.add_argument("--trained", type=int, nargs="*", default=[1, 2, 5, 10])
    parser.add_argument("--method", default="esd-x")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cache-steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = build(args.device)
    rows = []
    for method in ("uce", "rece"):
        for count in args.closed_form:
            rows.append({"kind": "closed form", **measure(model, method, count)})
            print(json.dumps(rows[-1]), flush=True)
    trained = model.at_resolution(args.resolution // 8)
    for count in args.trained:
        rows.append({"kind": "trained", "resolution": args.resolution, "steps": args.steps,
                     **measure(trained, args.method, count, steps=args.steps, batch=1, cache_seeds=1,
                               cache_steps=args.cache_steps)})
        print(json.dumps(rows[-1]), flush=True)
    fits = {}
    for name, part in (("uce", [r for r in rows if r["method"] == "uce"]),
                       ("rece", [r for r in rows if r["method"] == "rece"]),
                       (args.method, [r for r in rows if r["kind"] == "trained"])):
        if part:
            a, b = slope(part, "seconds")
            m0, m1 = slope(part, "peak_rise_bytes")
            fits[name] = {"seconds_per_concept": round(b, 3), "seconds_at_0": round(a, 2),
                          "seconds_at_100": round(a + 100 * b, 1), "bytes_per_concept": round(m1),
                          "peak_rise_at_100_bytes": round(m0 + 100 * m1)}
    settings = {"device": args.device, "torch_threads": torch.get_num_threads(), "model": "SD1.5 UNet config, "
                "random weights; 12-layer 768-wide CLIP text encoder", "date": time.strftime("%Y-%m-%d"),
                "command": "python bench/many_concepts_scale.py " + " ".join(sys.argv[1:])}
    OUT.mkdir(exist_ok=True)
    (OUT / "many_concepts_scale.json").write_text(json.dumps({"settings": settings, "rows": rows, "fits": fits},
                                                             indent=2) + "\n")
    lines = [f"# Many concepts in one patch, SD1.5 dimensions, random weights ({args.device})", "",
             f"`{settings['command']}` ({settings['date']}, {settings['torch_threads']} threads). Trained rows: "
             f"{args.resolution} px, {args.steps} steps, batch 1, one {args.cache_steps}-step trajectory per "
             "concept. Peak: the rise of the resident set (CPU) or the allocator's peak (GPU) during training.",
             "", "| kind | method | concepts | seconds | peak rise MB | CPU share |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['method']} | {r['concepts']} | {r['seconds']:.1f} | "
              f"{r['peak_rise_bytes'] / 2**20:.0f} | {r['cpu_share']:.2f} |" for r in rows]
    lines += ["", "| method | s per concept | s at 100 (fitted) | MB per concept | peak rise at 100 MB (fitted) |",
              "|---|---|---|---|---|"]
    lines += [f"| {m} | {f['seconds_per_concept']:.3f} | {f['seconds_at_100']:.1f} | "
              f"{f['bytes_per_concept'] / 2**20:.1f} | {f['peak_rise_at_100_bytes'] / 2**20:.0f} |"
              for m, f in fits.items()]
    (OUT / "many_concepts_scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
