"""Peak memory of one training run at SD1.5 size, with random weights (nothing downloaded).

    python bench/train_memory.py [--batch 1 4] [--checkpointing on off] [--resolution 512] [--method memory]
                                 [--steps 2] [--device cpu]

Builds an SD1.5-architecture UNet (diffusers' SD1.5 config, 860M parameters) and a 12-layer, 768-wide CLIP text
encoder (the toy tokenizer's vocabulary: the text side is under 2% of the memory), then trains one patch per batch
size, with and without gradient checkpointing (the default for a checkpoint: on), in a fresh process each, so
that one run's peak does not hide the next. CPU: the rise of the resident set above
what the loaded model already holds; GPU: the allocator's peak above the loaded model. Writes one JSON line per
run to stdout and the whole list to bench/results/train_memory.json (or --out)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu")


def build(device: str):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure_core.backends.diffusers_backend import DiffusersDenoiser
    from erasure_core.toy.model import SCHEDULER_CONFIG, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    unet = UNet2DConditionModel(**SD15_UNET)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        **SD15_TEXT))
    for module in (unet, text):
        module.to(device)
    return DiffusersDenoiser(unet, text, tokenizer, SCHEDULER_CONFIG, name="sd15-random")


def one(batch: int, resolution: int, method: str, steps: int, device: str, checkpointing: bool) -> dict:
    import torch

    from erasure_core.engine import TrainConfig
    from erasure_core.methods import train_patch
    from erasure_core.toy.benchmark import PeakMemory

    model = build(device).at_resolution(resolution // 8)  # no VAE here: the UNet works on 64 x 64 latents
    config = TrainConfig(concept="a circle", method=method, steps=steps, batch=batch, tokens=8, cache_seeds=1,
                         cache_steps=2, gradient_checkpointing=checkpointing)
    start = time.time()
    with PeakMemory(torch.device(device)) as peak:
        train_patch(model, config)
    return {"method": method, "batch": batch, "gradient_checkpointing": checkpointing, "resolution": resolution,
            "steps": steps, "device": device,
            "peak_rise_gb": round(peak.peak_bytes / 2**30, 2), "seconds": round(time.time() - start, 1),
            "unet_parameters_m": round(sum(p.numel() for p in model.unet.parameters()) / 1e6),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--method", default="memory")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_memory.json"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.batch[0], args.resolution, args.method, args.steps, args.device,
                             args.checkpointing[0] == "on")), flush=True)
        return
    runs = []
    for mode in args.checkpointing:
        for batch in args.batch:
            done = subprocess.run([sys.executable, __file__, "--one", "--batch", str(batch), "--checkpointing", mode,
                                   "--resolution", str(args.resolution), "--method", args.method, "--steps",
                                   str(args.steps), "--device", args.device], capture_output=True, text=True)
            line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else json.dumps(
                {"batch": batch, "gradient_checkpointing": mode == "on",
                 "failed": (done.stderr.strip().splitlines() or ["killed"])[-1], "returncode": done.returncode})
            print(line, flush=True)
            runs.append(json.loads(line))
    Path(args.out).write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
