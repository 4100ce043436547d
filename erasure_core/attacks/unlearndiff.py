"""UnlearnDiffAtk (Zhang et al., ECCV 2024, "To generate or not? Safety-driven unlearned diffusion models are still
easy to generate unsafe images"), written from the paper: a few discrete tokens are put before the prompt and
chosen so that the *patched* model's denoising loss on pictures of the erased concept falls; the model's own
denoiser is the classifier the attack climbs. The discrete search is ours: each step ranks every allowed token per
slot by the loss gradient through its one-hot, tries a few of the best swaps on a fixed batch (the same pictures,
timesteps and noise, so candidates are compared fairly) and keeps the best, as GCG does for language models."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import AttackSetup, Found, Progress, compose_ids, with_slots, word_token_ids, words_of


@dataclass
class UnlearnDiffSettings:
    tokens: int = 3            # adversarial prefix tokens (the paper: 5 on SD1.4's 77-token prompts)
    steps: int = 20
    top_k: int = 8             # best-ranked tokens per slot to draw swaps from
    candidates: int = 6        # swaps tried per step
    renders_per_cell: int = 2  # pictures of the concept per cell: the fixed batch the loss is measured on
    seeds_per_cell: int = 4
    seed: int = 0


def find(denoiser, setup: AttackSetup, settings: UnlearnDiffSettings, progress: Progress | None = None) -> Found:
    table = denoiser.token_embeddings()
    vocab = word_token_ids(denoiser, setup)
    g = torch.Generator().manual_seed(settings.seed)
    images, cells = setup.renders(settings.renders_per_cell, seed=settings.seed + 8_000_000)
    x0 = denoiser.encode_image(images)
    slot_ids = {c: compose_ids(denoiser, "", settings.tokens, setup.cell_prompt(c), int(vocab[0])) for c in setup.cells}
    ids = torch.stack([slot_ids[c][0] for c in cells])
    positions = slot_ids[cells[0]][1]
    # one fixed draw of timesteps (stratified over the schedule) and noise: every candidate sees the same batch
    sched = denoiser.scheduler()
    steps_total = sched.config.num_train_timesteps
    t = ((torch.arange(len(x0)) + torch.rand(len(x0), generator=g)) * steps_total / len(x0)).long()
    noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
    a = sched.alphas_cumprod[t].to(x0.device, x0.dtype).view(-1, 1, 1, 1)
    x_t, t = a.sqrt() * x0 + (1 - a).sqrt() * noise, t.to(x0.device)

    def loss_of(prefix_embeds: torch.Tensor) -> torch.Tensor:
        cond = denoiser.encode_embeddings(ids, with_slots(table, ids, positions, prefix_embeds))
        return (denoiser.predict_noise(x_t, t, cond) - noise).square().mean()

    # start from the article repeated ("a a a a circle with stripes"): a harmless prefix, so the search only
    # keeps tokens that make the concept likelier than the plain prompt does
    current = torch.tensor(denoiser.tokenizer("a", add_special_tokens=False).input_ids * settings.tokens)
    with torch.no_grad():
        start_loss = best_loss = float(loss_of(table[current]))
    for step in range(settings.steps):
        onehot = torch.zeros(settings.tokens, len(vocab), device=table.device)
        onehot[torch.arange(settings.tokens), (vocab[:, None] == current[None]).float().argmax(0)] = 1
        onehot.requires_grad_(True)
        grad, = torch.autograd.grad(loss_of(onehot @ table[vocab]), onehot)
        ranked = vocab[(-grad).topk(settings.top_k, dim=1).indices]  # (tokens, top_k): biggest predicted fall
        with torch.no_grad():
            for _ in range(settings.candidates):
                slot = int(torch.randint(0, settings.tokens, (1,), generator=g))
                trial = current.clone()
                trial[slot] = ranked[slot, int(torch.randint(0, settings.top_k, (1,), generator=g))]
                trial_loss = float(loss_of(table[trial]))
                if trial_loss < best_loss:
                    current, best_loss = trial, trial_loss
        if progress:
            progress(step + 1, settings.steps)
    prefix = words_of(denoiser, current)
    prompts = [f"{prefix} {setup.cell_prompt(c)}" for c in setup.cells for _ in range(settings.seeds_per_cell)]
    seeds = [13_000 + 100 * c + k for c in setup.cells for k in range(settings.seeds_per_cell)]
    return Found(denoiser.encode(prompts), prompts, seeds, {"prefix": prefix, "start_loss": round(start_loss, 5),
                                                            "final_loss": round(best_loss, 5)})
