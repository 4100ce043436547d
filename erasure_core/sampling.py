"""DDIM sampling with classifier-free guidance, through diffusers' scheduler.

The noise of every image comes from its own seed, so an image depends only on
its prompt and seed, never on the batch it was generated in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

    from .denoiser import Conditioning

# (x_t, t, conditioning) -> predicted noise
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, "Conditioning"], torch.Tensor]


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """One standard-normal tensor of `shape` per seed, stacked."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: ε(∅) + w·(ε(c) − ε(∅)). The one place the project combines the two."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def guided_noise(predict: NoisePredictor, x: torch.Tensor, t: torch.Tensor, cond: "Conditioning",
                 uncond: "Conditioning", guidance: float) -> torch.Tensor:
    """The guided noise estimate at (x, t): one batched pass over [uncond ; cond], combined by `cfg`. Guidance 1
    is the conditional prediction alone (what CFG reduces to), so only that pass runs. `t` is one timestep or one
    per image; cond and uncond hold one conditioning per image of x."""
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0:
        t = t.expand(len(x))
    if guidance == 1.0:
        return predict(x, t, cond)
    eps_u, eps_c = predict(torch.cat([x, x]), torch.cat([t, t]), type(cond).cat([uncond, cond])).chunk(2)
    return cfg(eps_u, eps_c, guidance)


@torch.no_grad()
def ddim_sample(predict: NoisePredictor, cond: "Conditioning", uncond: "Conditioning", noise: torch.Tensor,
                scheduler: DDIMScheduler, steps: int = 25, guidance: float = 3.0,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run DDIM from `noise` with CFG; cond/uncond hold one conditioning per image. Returns x_0."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(guided_noise(predict, x, t, cond, uncond, guidance), t, x).prev_sample
        if progress:
            progress(i + 1, steps)
    return x
