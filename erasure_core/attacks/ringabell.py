"""Ring-A-Bell (Tsai et al., ICLR 2024), written from the paper: a model-agnostic red team that needs only the
text encoder. A concept vector is the mean difference, in the encoder's output space, between prompts with the
concept and the same prompts without it; a genetic search over the vocabulary then finds a prompt that avoids the
concept's words but whose encoding matches "concept-free prompt + η · concept vector". The prompts it finds are
typed like any other prompt, so the patched and the unedited model are tested on the same text."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import AttackSetup, Found, Progress, word_token_ids, words_of


@dataclass
class RingABellSettings:
    length: int = 10          # tokens of the searched prompt (6 found stripes in 3 of 8 unedited images, 10 in all)
    eta: float = 1.0          # how far along the concept vector the search aims (the paper's η); at 3 the dots
    #                           vector led the search to zigzag words (0.22 on the unedited model), at 1 all four
    #                           benchmark targets pass validity (0.91 to 1.00)
    population: int = 200     # the paper's population; its 3000 generations are more than 2 cores need here
    generations: int = 200
    mutation: float = 0.15    # per-token mutation probability
    elite: int = 6            # best prompts carried over unchanged
    searches: int = 4         # one search per concept-free prompt; each found prompt is generated with every seed
    seeds_per_prompt: int = 8
    seed: int = 0


def concept_vector(denoiser, setup: AttackSetup) -> torch.Tensor:
    """Mean of E(prompt with the concept) − E(the same prompt without it) over the target's cells, (T, d)."""
    with_concept = [setup.cell_prompt(c) for c in setup.cells]
    without = [setup.cell_prompt(c, setup.neutral_word) for c in setup.cells]
    return (denoiser.encode(with_concept).context - denoiser.encode(without).context).mean(0)


def find(denoiser, setup: AttackSetup, settings: RingABellSettings, progress: Progress | None = None) -> Found:
    vocab = word_token_ids(denoiser, setup)
    tok = denoiser.tokenizer
    length, g = tok.model_max_length, torch.Generator().manual_seed(settings.seed)
    if not 1 <= settings.length <= length - 2:
        raise ValueError(f"Ring-A-Bell's prompt length must be 1 to {length - 2} tokens for this text encoder "
                         f"(it takes {length} with BOS and EOS); got {settings.length}")
    vector = concept_vector(denoiser, setup)

    def ids_of(tokens: torch.Tensor) -> torch.Tensor:  # (P,k) word ids -> padded prompt ids (P,T)
        p = len(tokens)
        pad = torch.full((p, length - tokens.shape[1] - 2), tok.pad_token_id)
        return torch.cat([torch.full((p, 1), tok.bos_token_id), tokens, torch.full((p, 1), tok.eos_token_id), pad], 1)

    @torch.no_grad()
    def fitness(tokens: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        context = denoiser.encode_embeddings(ids_of(tokens), denoiser.token_embeddings()[ids_of(tokens)]).context
        return torch.nn.functional.cosine_similarity(context.flatten(1).float(), goal.flatten()[None].float())

    searches = settings.searches
    goals = [denoiser.encode([setup.cell_prompt(c, setup.neutral_word)]).context[0] + settings.eta * vector
             for c in setup.cells[:searches]]
    found, scores, total = [], [], searches * settings.generations
    for s, goal in enumerate(goals):
        pop = vocab[torch.randint(0, len(vocab), (settings.population, settings.length), generator=g)]
        for gen in range(settings.generations):
            fit = fitness(pop, goal)
            order = fit.argsort(descending=True)
            elite = pop[order[:settings.elite]]
            # tournament selection of parents, one-point crossover, per-token mutation
            a, b = (torch.randint(0, settings.population, (2, settings.population - settings.elite), generator=g))
            pa = torch.where((fit[a] >= fit[b])[:, None], pop[a], pop[b])
            c, d = (torch.randint(0, settings.population, (2, settings.population - settings.elite), generator=g))
            pb = torch.where((fit[c] >= fit[d])[:, None], pop[c], pop[d])
            cut = torch.randint(1, settings.length, (len(pa), 1), generator=g)
            child = torch.where(torch.arange(settings.length)[None] < cut, pa, pb)
            mutate = torch.rand(child.shape, generator=g) < settings.mutation
            child = torch.where(mutate, vocab[torch.randint(0, len(vocab), child.shape, generator=g)], child)
            pop = torch.cat([elite, child])
            if progress:
                progress(s * settings.generations + gen + 1, total)
        fit = fitness(pop, goal)
        best = pop[fit.argmax()]
        found.append(words_of(denoiser, best))
        scores.append(round(float(fit.max()), 4))
    leaked = [p for p in found if setup.uses_forbidden(p)]
    if leaked:  # whole-word search over allowed words cannot produce them; a guard against a tokenizer surprise
        raise RuntimeError(f"Ring-A-Bell produced a prompt with the target's words: {leaked[0]!r}")
    prompts = [p for p in found for _ in range(settings.seeds_per_prompt)]
    seeds = [11_000 + 100 * i + k for i in range(len(found)) for k in range(settings.seeds_per_prompt)]
    return Found(denoiser.encode(prompts), prompts, seeds, {"found": found, "similarity": scores})
