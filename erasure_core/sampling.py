"""DDIM sampling with classifier-free guidance, through diffusers' scheduler.

The noise of every image comes from its own seed, so an image depends only on
its prompt and seed, never on the batch it was generated in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from diffusers import DDIMScheduler

if TYPE_CHECKING:
    from .denoiser import Conditioning

# (x_t, t, conditioning) -> predicted noise
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, "Conditioning"], torch.Tensor]


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """One standard-normal tensor of `shape` per seed, stacked."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def ddim_sample(predict: NoisePredictor, cond: "Conditioning", uncond: "Conditioning", noise: torch.Tensor,
                scheduler: DDIMScheduler, steps: int = 25, guidance: float = 3.0,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run DDIM from `noise` with CFG; cond/uncond hold one conditioning per image. Returns x_0."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    context = type(cond).cat([uncond, cond])
    for i, t in enumerate(scheduler.timesteps):
        tt = t.expand(2 * len(x)).to(x.device)
        eps_u, eps_c = predict(torch.cat([x, x]), tt, context).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample
        if progress:
            progress(i + 1, steps)
    return x
