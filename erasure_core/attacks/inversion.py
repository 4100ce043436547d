"""Concept inversion (Pham et al. 2023, "Circumventing concept erasure methods for text-to-image generative
models"), written from the paper: learn a few new token embeddings through the *patched* model with the
denoising loss on pictures of the erased concept (textual inversion), then prompt with them. If the erasure only
cut the link from the concept's words, a new word finds the concept again."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import AttackSetup, Found, Progress, compose_ids, denoising_loss, with_slots


@dataclass
class InversionSettings:
    tokens: int = 2            # new embeddings learned (the paper learns one; two give the toy model room)
    steps: int = 120
    lr: float = 0.02           # Adam on the embeddings
    batch: int = 8
    renders_per_cell: int = 8  # ground-truth pictures of the concept to invert
    seeds_per_cell: int = 4    # generations per cell with the learned tokens
    seed: int = 0


def find(denoiser, setup: AttackSetup, settings: InversionSettings, progress: Progress | None = None) -> Found:
    table = denoiser.token_embeddings()
    init_id = denoiser.tokenizer(setup.neutral_word, add_special_tokens=False).input_ids[0]
    slots = {}
    for cell in setup.cells:
        before, after = setup.cell_parts(cell)
        slots[cell] = compose_ids(denoiser, before, settings.tokens, after, init_id)
    learned = table[init_id].repeat(settings.tokens, 1).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([learned], lr=settings.lr)
    images, cells = setup.renders(settings.renders_per_cell, seed=settings.seed + 7_000_000)
    x0_all = denoiser.encode_image(images)
    g = torch.Generator().manual_seed(settings.seed)

    def conditioning(cell_list: list[int], embeds: torch.Tensor):
        ids = torch.stack([slots[c][0] for c in cell_list])
        return denoiser.encode_embeddings(ids, with_slots(table, ids, slots[cell_list[0]][1], embeds))

    losses = []
    for step in range(settings.steps):
        pick = torch.randint(0, len(x0_all), (settings.batch,), generator=g)
        loss = denoising_loss(denoiser, x0_all[pick], conditioning([cells[i] for i in pick], learned), g)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, settings.steps)
    gen_cells = [c for c in setup.cells for _ in range(settings.seeds_per_cell)]
    with torch.no_grad():
        cond = conditioning(gen_cells, learned.detach())
    prompts = [setup.cell_prompt(c, "<inverted>") for c in gen_cells]
    seeds = [9_000 + 100 * c + k for c in setup.cells for k in range(settings.seeds_per_cell)]
    mean = lambda xs: round(sum(xs) / len(xs), 5)  # noqa: E731  (ten steps: one batch's timesteps are noise)
    return Found(cond, prompts, seeds, {"first_loss": mean(losses[:10]), "last_loss": mean(losses[-10:])})
