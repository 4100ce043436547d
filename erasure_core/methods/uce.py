"""UCE (Gandikota et al. 2024): a closed-form edit of the attn2 to_k / to_v matrices, no training loop.

For each such W: W' = (Σ_i v_i c_iᵀ + Σ_j W c_j c_jᵀ + λ W)(Σ_i c_i c_iᵀ + Σ_j c_j c_jᵀ + λ I)⁻¹, where c_i are
the erased prompt's token embeddings, v_i = W·c_anchor_i their new outputs (anchor: the alternative, or the
empty prompt), and c_j the preserved prompts' token embeddings. The formula is verified from the authors'
code; taking every non-padding token position of the prompt, aligned with the anchor's, is our choice.
"""
from __future__ import annotations

import torch

from ..denoiser import Denoiser
from ..engine import TrainConfig, finish_patch, setup
from .registry import MethodSpec, TrainResult, register

RIDGE = 0.5  # λ


def _token_rows(denoiser: Denoiser, prompt: str, length: int) -> torch.Tensor:
    """The first `length` token embeddings of a prompt's context, (length, d), in float64."""
    return denoiser.encode([prompt]).context[0, :length].double()


STAGE = "closed-form edit of the projections"


def closed_form_edit(weights: dict[str, torch.Tensor], erased: torch.Tensor, anchors: torch.Tensor,
                     kept: torch.Tensor, erase_scale: float = 1.0, preserve_scale: float = 1.0,
                     ridge: float = RIDGE, progress=None) -> dict[str, torch.Tensor]:
    """UCE's W' for each W (float64, (out, d)): rows of `erased` map to W·(the same rows of `anchors`), rows of
    `kept` to W·themselves. `progress(done, total)` before each matrix."""
    eye = torch.eye(erased.shape[1], dtype=torch.float64)
    inverse = torch.linalg.inv(erase_scale * erased.T @ erased + preserve_scale * kept.T @ kept + ridge * eye)
    edited = {}
    for i, (name, w) in enumerate(weights.items()):
        if progress:
            progress(i, len(weights))
        edited[name] = (erase_scale * (w @ anchors.T) @ erased + preserve_scale * w @ kept.T @ kept + ridge * w) \
            @ inverse
    return edited


def prompt_rows(denoiser: Denoiser, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every erased prompt's token rows, the anchor's aligned with each, and every preserved prompt's rows."""
    anchor = config.alternative or ""
    erased, anchors = [], []
    for concept in config.concepts:  # several concepts: their rows are erased together, in one solve
        n = max(denoiser.prompt_length(concept), denoiser.prompt_length(anchor))
        erased.append(_token_rows(denoiser, concept, n))
        anchors.append(_token_rows(denoiser, anchor, n))
    kept = [_token_rows(denoiser, p, denoiser.prompt_length(p)) for p in config.preserve]
    erased, anchors = torch.cat(erased), torch.cat(anchors)
    return erased, anchors, torch.cat(kept) if kept else erased.new_zeros(0, erased.shape[1])


def train_uce(denoiser: Denoiser, config: TrainConfig, *, cache=None, checkpoint=None, progress=None, cancel=None,
              erase_scale: float = 1.0, preserve_scale: float = 1.0, ridge: float = RIDGE) -> TrainResult:
    """Closed form: `cache`, `checkpoint` and `cancel` are accepted for the common signature and unused (there
    are no trajectories to sample); progress reports one step per edited projection."""
    erased, anchors, kept = prompt_rows(denoiser, config)
    parts = setup(denoiser, config, tokens=0, projections=("to_k", "to_v"), delta_layers=config.layers)
    weights = denoiser.projection_weights()
    original = {name: weights[name].detach().double().cpu() for name in parts.deltas}
    step = (lambda done, total: progress(done, total, None, stage=STAGE)) if progress else None
    edited = closed_form_edit(original, erased, anchors, kept, erase_scale, preserve_scale, ridge, step)
    with torch.no_grad():
        for name, delta in parts.deltas.items():
            delta.copy_((edited[name] - original[name]).to(delta.dtype))
    if progress:
        progress(len(parts.deltas), len(parts.deltas), None, stage=STAGE)
    return TrainResult(finish_patch(denoiser, parts, config))


register(MethodSpec("uce", "closed-form edit of attn2 to_k/to_v, in seconds",
                    "Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024", reconstruction=False,
                    kind="closed-form", trains="attn2 to_k/to_v deltas", train=train_uce, takes_alternative=True,
                    delta_lr=None))
