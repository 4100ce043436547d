"""Train the toy text-to-image model from scratch, resumably.

Data are rendered on the fly from seeds that depend only on the step, so a run
stopped and resumed from its checkpoint sees exactly the batches an uninterrupted
run would. Checkpoints hold the model, its EMA, the optimiser and the step.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import ASSETS, MAX_TOKENS, build_text_encoder, build_unet, load_tokenizer, save_weights, \
    train_scheduler
from .world import caption, render, random_scene

CAPTION_DROPOUT = 0.1  # empty prompt, so classifier-free guidance works
MIN_SNR_GAMMA = 5.0    # min-SNR loss weighting: converges markedly faster than plain MSE


def training_batch(step: int, batch: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The batch of a step: images in [-1, 1] and captions, a pure function of (step, seed)."""
    images, captions = [], []
    for i in range(batch):
        rng = np.random.default_rng([seed, step, i])
        scene = random_scene(rng)
        images.append(render(scene))
        captions.append("" if rng.random() < CAPTION_DROPOUT else caption(scene, rng))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2 - 1
    return x.contiguous(), captions


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - decay)


def train(run_dir: Path, steps: int = 8000, batch: int = 32, lr: float = 5e-4, seed: int = 0,
          checkpoint_minutes: float = 5.0, bf16: bool = True, threads: int | None = None,
          log_every: int = 50) -> Path:
    """Train (or resume) the toy model; returns the folder of the exported EMA weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer()
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    ema_unet, ema_text = build_unet(), build_text_encoder(tokenizer)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text_encoder.state_dict())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = train_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr

    ckpt_path = run_dir / "checkpoint.pt"
    start = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from step {start}")

    def save(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                    "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                    "optimizer": opt.state_dict(), "step": step, "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(ckpt_path)  # atomic: a kill mid-save never leaves a broken checkpoint
        save_weights(ema_unet, ema_text, tokenizer, run_dir / "export")
        (run_dir / "export" / "step.txt").write_text(f"{step}\n")

    warmup = 200
    last_save, losses = time.time(), []
    log = open(run_dir / "train.log", "a")
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="toy-train")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        x0, captions = training_batch(step, batch, seed)
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        xt = sched.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            context = text_encoder(ids)[0]
            pred = unet(xt, t, context).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            mean = float(np.mean(losses))
            losses.clear()
            bar.set_postfix(loss=f"{mean:.4f}")
            log.write(f"{time.strftime('%H:%M:%S')} step {step + 1} loss {mean:.5f}\n")
            log.flush()
        if time.time() - last_save > checkpoint_minutes * 60 or step + 1 == steps:
            save(step + 1)
            last_save = time.time()
    log.close()
    if start >= steps:
        print(f"already trained to step {start}")
    return run_dir / "export"


def ship(export_dir: Path, assets: Path = ASSETS) -> None:
    """Copy exported weights into the package's assets (what the repo ships)."""
    import shutil

    for f in export_dir.iterdir():
        shutil.copy2(f, assets / f.name)
