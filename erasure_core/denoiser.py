"""The denoiser protocol: the small surface every erasure method is written against.

A backend (diffusers, ComfyUI, A1111/Forge) wraps its host's model and exposes:
encode prompts, predict noise for (x_t, t, conditioning) with whatever patches are
attached, its scheduler, and its cross-attention layers under canonical names.
Trajectory sampling and the training cache are written once, here, on top of it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch


@dataclass
class Conditioning:
    """Text conditioning: the cross-attention context (B,T,d) plus any extra inputs
    the UNet needs (SDXL's pooled text embedding and size ids)."""

    context: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.context.shape[0]

    def expand(self, n: int) -> "Conditioning":
        """Broadcast a single conditioning to a batch of n."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a batch of {len(self)} to {n}")
        return Conditioning(self.context.expand(n, *self.context.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.extra.items()})

    def select(self, index) -> "Conditioning":
        """Rows `index` of the batch (a slice, or a tensor of row numbers), extra inputs alike."""
        return Conditioning(self.context[index], {k: v[index] for k, v in self.extra.items()})

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([c.context for c in items]),
                            {k: torch.cat([c.extra[k] for c in items]) for k in items[0].extra})

    def to(self, device=None, dtype=None) -> "Conditioning":
        return Conditioning(self.context.to(device=device, dtype=dtype),
                            {k: v.to(device=device, dtype=dtype) for k, v in self.extra.items()})


class Denoiser(Protocol):
    """What a backend provides. `predict_noise` always returns ε, whatever the model predicts."""

    context_dim: int
    sample_shape: tuple[int, ...]  # (C,H,W) of x_t
    device: torch.device
    default_guidance: float        # the classifier-free guidance previews sample with
    vocabulary: object | None      # erasure_core.vocabulary.Vocabulary where the model knows its world, else None

    def encode(self, prompts: list[str]) -> Conditioning: ...

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    def scheduler(self):
        """A fresh DDIM scheduler configured for the model."""
        ...

    def layer_names(self) -> list[str]:
        """Canonical (LDM-path) names of the cross-attention layers."""
        ...

    def cross_attention_modules(self) -> dict[str, torch.nn.Module]:
        """The attn2 modules predict_noise runs, keyed by canonical layer name, each with `heads`, `to_q` and
        `to_k`: what erasure_core.attention_maps reads the attention probabilities from. Read-only."""
        ...

    def transformer_block(self, name: str) -> torch.nn.Module:
        """The spatial transformer at LDM path `name` (e.g. output_blocks.4.1) inside `network()`, read-only:
        SAeUron reads its output (erasure_core.sae.hook_block). Raises KeyError where the model has none."""
        ...

    def network(self) -> torch.nn.Module:
        """The denoising network (the UNet) itself, read-only: training recomputes its transformer blocks in the
        backward pass when asked (TrainConfig.gradient_checkpointing)."""
        ...

    def generate(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = ...,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """One image per (prompt, seed), with the attached patches: DDIM (`scheduler()`) with classifier-free
        guidance (erasure_core.sampling.ddim_sample) from per-seed noise, decoded. Returns float images
        (N,3,H,W) in [0,1] on the CPU; each depends only on its prompt and seed. `progress(done, total)` is
        called after every step. Backends may take more keywords (ComfyUI: `negative`)."""
        ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W) float in [0,1] to x_0 (N,*sample_shape) on `device`, in the space predict_noise
        denoises (VAE latents, scaled as the model expects; the toy model's pixels in [-1,1]). Raises ValueError
        where the backend has no encoder (a ComfyUI denoiser built without a VAE)."""
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x_0 to images (N,3,H,W) float in [0,1] on the CPU: the inverse of `encode_image` (up to the VAE's
        loss). Raises ValueError where the backend has no decoder."""
        ...

    def prompt_length(self, prompt: str) -> int:
        """How many context positions the prompt's tokens fill, BOS to EOS, padding excluded."""
        ...

    def projection_weights(self) -> dict[str, torch.Tensor]:
        """The frozen attn2 projection weights, keyed "<canonical layer>.<to_q|to_k|to_v|to_out.0>".
        Read-only: methods derive shapes and closed-form edits from them, never write to them."""
        ...

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of every linear and conv weight of the UNet, keyed by canonical (LDM) module path: what deltas
        outside cross-attention (ESD-u) are trained and checked against."""
        ...

    def attach(self, patches: list) -> "Attachment":
        """Attach [(ErasurePatch, strength), ...] for the following predict_noise calls; validates first, so a
        bad patch leaves nothing attached. Patches may hold trainable tensors: gradients flow into them."""
        ...

    def fingerprint(self) -> str:
        """The base model's fingerprint (erasure_core.patch.fingerprint_of over attn2 to_k/to_v, LDM order)."""
        ...


class Attachment(Protocol):
    warnings: list[str]

    def detach(self) -> None: ...


@contextmanager
def patched(denoiser: Denoiser, patches: list) -> Iterator[Attachment]:
    """`with patched(denoiser, [(patch, strength)]):` predictions inside the block see the patches."""
    handle = denoiser.attach(patches)
    try:
        yield handle
    finally:
        handle.detach()


def to_epsilon(output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """Convert a model output to ε. v = α·ε − σ·x0 and x_t = α·x0 + σ·ε give ε = σ·x_t + α·v."""
    if prediction_type == "epsilon":
        return output
    a = alphas_cumprod.to(x.device)[t.long()].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "v_prediction":
        return sigma * x + alpha * output
    if prediction_type == "sample":
        return (x - alpha * output) / sigma
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


@dataclass
class CacheRecord:
    """One step of a frozen-model trajectory: the training data of ESD-family methods."""

    x_t: torch.Tensor           # (B,C,H,W)
    t: torch.Tensor             # (B,)
    eps_uncond: torch.Tensor    # ε*(x_t, ∅)
    eps_concept: torch.Tensor   # ε*(x_t, c_e)
    eps_alternative: torch.Tensor | None = None  # ε*(x_t, c_a) when an alternative is set
    eps_preserve: torch.Tensor | None = None     # ε*(x_t, c_r) per preserved prompt, (B,R,C,H,W)
    concept_index: torch.Tensor | None = None    # (B,) which erased prompt's trajectory, for patches erasing several


@torch.no_grad()
def sample_trajectories(denoiser: Denoiser, concept: Conditioning, empty: Conditioning, noise: torch.Tensor,
                        steps: int = 50, guidance: float = 3.0, alternative: Conditioning | None = None,
                        progress: Callable[[int, int], None] | None = None) -> Iterator[CacheRecord]:
    """Run the frozen model's DDIM sampler on `concept` with CFG, yielding a CacheRecord per step.

    CFG computes ε(∅) and ε(c_e) anyway, so recording them costs nothing extra; ε(c_a) costs one
    more pass per step when an alternative is set."""
    from .sampling import cfg

    n = len(noise)
    sched = denoiser.scheduler()
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    parts = [empty.expand(n), concept.expand(n)] + ([alternative.expand(n)] if alternative is not None else [])
    cond = Conditioning.cat(parts)
    for i, t in enumerate(sched.timesteps):
        tt = t.expand(len(parts) * n).to(x.device)
        eps = denoiser.predict_noise(torch.cat([x] * len(parts)), tt, cond).chunk(len(parts))
        yield CacheRecord(x.clone(), tt[:n].clone(), eps[0], eps[1], eps[2] if alternative is not None else None)
        x = sched.step(cfg(eps[0], eps[1], guidance), t, x).prev_sample
        if progress:
            progress(i + 1, steps)


def at_resolution(model, pixels: int):
    """`model` trained and sampled at `pixels` × `pixels` (0: as it is): backends that can offer
    `at_resolution` (diffusers, A1111); one that cannot says so."""
    if not pixels:
        return model
    if not hasattr(model, "at_resolution"):
        raise ValueError(f"{getattr(model, 'name', 'this model')} trains at its own resolution only")
    return model.at_resolution(pixels)

