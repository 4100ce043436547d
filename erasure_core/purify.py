"""Purification of a real image (All but One, Hong et al. AAAI 2024; OUR RECONSTRUCTION): DDIM-invert the image
under the original model, then regenerate it from the inverted noise under the edited model with the same
condition. Whatever the patch erased (or replaced) is removed from the picture; the layout, carried by the
inverted noise, stays."""
from __future__ import annotations

from typing import Callable

import torch

from .denoiser import Conditioning, Denoiser, patched


def _step(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move of x from noise level ᾱ = a_from to a_to, with noise estimate eps."""
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def _guided(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, empty: Conditioning,
            guidance: float) -> torch.Tensor:
    if guidance == 1.0:
        return denoiser.predict_noise(x, t.expand(len(x)), cond)
    eps_u, eps_c = denoiser.predict_noise(torch.cat([x, x]), t.expand(2 * len(x)),
                                          Conditioning.cat([empty, cond])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def purify(denoiser: Denoiser, patches: list, latents: torch.Tensor, prompt: str, steps: int = 50,
           guidance: float = 1.0, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Invert `latents` (N,C,H,W, the model's x_0 space) under the original model and regenerate them with
    `patches` attached. Guidance 1 (conditional prediction only) makes the inversion nearly exact, so an image
    without the erased concept comes back almost unchanged. Returns the purified latents."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    sched = denoiser.scheduler()
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.flip(0)  # ascending: clean -> noisy
    alphas = sched.alphas_cumprod.to(latents.device, latents.dtype)
    n = len(latents)
    cond, empty = denoiser.encode([prompt]).expand(n), denoiser.encode([""]).expand(n)
    x = latents
    a_prev = torch.ones((), dtype=latents.dtype, device=latents.device)  # ᾱ of the clean image
    for i, t in enumerate(timesteps):
        eps = _guided(denoiser, x, t.to(x.device), cond, empty, guidance)
        x = _step(x, eps, a_prev, alphas[t])
        a_prev = alphas[t]
        if progress:
            progress(i + 1, 2 * steps)
    with patched(denoiser, patches):
        for i, t in enumerate(timesteps.flip(0)):
            eps = _guided(denoiser, x, t.to(x.device), cond, empty, guidance)
            a_next = alphas[timesteps.flip(0)[i + 1]] if i + 1 < steps else torch.ones_like(a_prev)
            x = _step(x, eps, alphas[t], a_next)
            if progress:
                progress(steps + i + 1, 2 * steps)
    return x
