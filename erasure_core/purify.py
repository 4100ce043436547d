"""Purification of a real image (All but One, Hong et al. AAAI 2024; OUR RECONSTRUCTION): DDIM-invert the image
under the original model, then regenerate it from the inverted noise under the edited model with the same
condition. Whatever the patch erased (or replaced) is removed from the picture; the layout, carried by the
inverted noise, stays.

Both directions use the sampler's own DDIM convention: the inversion is diffusers' DDIMInverseScheduler built from
the config of `denoiser.scheduler()`, the regeneration that scheduler itself, on the same timesteps reversed, with
the guidance of erasure_core.sampling.guided_noise."""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from .denoiser import Denoiser, patched
from .sampling import guided_noise

_SPACINGS = ("leading", "trailing")  # the timestep spacings DDIMInverseScheduler supports


def schedulers(denoiser: Denoiser, steps: int):
    """(sampler, inverse) on the same `steps` timesteps, the inverse's ascending, the sampler's descending.

    Both step ε, which is what predict_noise returns whatever the model predicts. Neither clips its x_0
    estimate: clipping is a sampling guard that cannot be inverted, and with it the toy model's images came back
    with 2.5x the error (mean |Δ| 0.113 against 0.045 at 20 steps, 8 seeds). A sampler spaced in a way the inverse
    cannot follow ("linspace") is respaced "leading" for both, so the two directions always pair up."""
    from diffusers import DDIMInverseScheduler

    sampler = denoiser.scheduler()
    overrides = {"prediction_type": "epsilon", "clip_sample": False}
    if sampler.config.get("timestep_spacing", "leading") not in _SPACINGS:
        overrides["timestep_spacing"] = "leading"
    sampler = type(sampler).from_config(sampler.config, **overrides)
    accepted = inspect.signature(DDIMInverseScheduler.__init__).parameters  # quiet about DDIM-only keys
    inverse = DDIMInverseScheduler.from_config({k: v for k, v in sampler.config.items() if k in accepted})
    sampler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    if not torch.equal(inverse.timesteps, sampler.timesteps.flip(0)):  # a guard: diffusers changed its spacing
        raise ValueError(f"the inverse DDIM timesteps {inverse.timesteps.tolist()} do not mirror the sampler's "
                         f"{sampler.timesteps.tolist()}")
    return sampler, inverse


@torch.no_grad()
def purify(denoiser: Denoiser, patches: list, latents: torch.Tensor, prompt: str, steps: int = 50,
           guidance: float = 1.0, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Invert `latents` (N,C,H,W, the model's x_0 space) under the original model and regenerate them with
    `patches` attached. Guidance 1 (conditional prediction only) makes the inversion nearly exact, so an image
    without the erased concept comes back almost unchanged. Returns the purified latents."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    sampler, inverse = schedulers(denoiser, steps)
    n = len(latents)
    cond, empty = denoiser.encode([prompt]).expand(n), denoiser.encode([""]).expand(n)
    x = latents
    for i, t in enumerate(inverse.timesteps):
        x = inverse.step(guided_noise(denoiser.predict_noise, x, t, cond, empty, guidance), t, x).prev_sample
        if progress:
            progress(i + 1, 2 * steps)
    with patched(denoiser, patches):
        for i, t in enumerate(sampler.timesteps):
            x = sampler.step(guided_noise(denoiser.predict_noise, x, t, cond, empty, guidance), t, x).prev_sample
            if progress:
                progress(steps + i + 1, 2 * steps)
    return x
