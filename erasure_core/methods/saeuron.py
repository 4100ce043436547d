"""SAeUron (Cywiński & Deja, ICML 2025): erase at generation time by editing sparse-autoencoder features of one
transformer block's output; no weight of the model changes.

1. A batch-TopK SAE (erasure_core.sae) learns the block's output over many prompts, seeds and the sampler's
   timesteps, unlabelled: the vocabulary's prompts on a model that has one (every cell of the toy world, as the
   paper's SAE sees every UnlearnCanvas prompt), else "a photo of <word>" over the shipped word list. It is
   stored once per base model and block (`*.sae.safetensors`) and reused by every later concept: a second
   concept costs only step 2.
2. Per timestep bucket, the features whose share of the concept's activation most exceeds their share of the
   others' (the preserved prompts and the empty prompt) are selected, the paper's score.
3. The patch holds those features, multiplier × their concept mean, and their mean on the others: at
   generation, a selected feature above that mean is set to the target, in both halves of the CFG batch.

Ours, for the toy world and 2 CPU cores (the paper's settings are for SD1.5 on a GPU): 32 features per bucket
and multiplier −10, chosen on stripes' validation seeds (bench/results/saeuron_toy.json) before any held-out
figure; SAE batch 1,024 rows at lr 1e-3; one seed per training prompt; the block is the second of the first
output level (SD1.5: output_blocks.4.1, the paper's object block; the toy: output_blocks.1.1).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..denoiser import Denoiser, sample_trajectories
from ..engine import Cancelled, TrainConfig
from ..patch import ErasurePatch, PatchError
from ..sampling import seeded_noise
from ..sae import (FeatureMeans, SAETrainer, SparseAutoencoder, concept_tensors, find_sae, hook_block, load_sae,
                   sae_fingerprint, select_features)
from .registry import MethodSpec, TrainResult, register

PER_BUCKET, MULTIPLIER = 32, -10.0
EXPANSION, TOP_K, SAE_BATCH, SAE_LR = 16, 32, 1024, 1e-3
CONCEPT_SEEDS, OTHER_SEEDS = 16, 4
SEED_OFFSET = 5000  # feature means on seeds no trajectory cache or evaluation group uses
WORD_TEMPLATES = ("a photo of {}", "a painting of {}")
WORDS = 256  # words of the shipped list a vocabulary-less model's SAE is trained on (x 2 templates)
STAGE_SAE, STAGE_SELECT = "training the sparse autoencoder", "selecting the concept's features"


def default_block(denoiser: Denoiser) -> str:
    """The second transformer block of the first output level with attention (levels grouped by width)."""
    shapes = denoiser.weight_shapes()
    blocks = sorted({int(n.split(".")[1]) for n in denoiser.layer_names() if n.startswith("output_blocks.")})
    widths = [shapes[f"output_blocks.{i}.1.proj_out"][0] for i in blocks]
    level = [b for b, w in zip(blocks, widths) if w == widths[0]]
    run = [b for i, b in enumerate(level) if b == level[0] + i]  # consecutive from the first
    return f"output_blocks.{run[min(1, len(run) - 1)]}.1"


def training_prompts(denoiser: Denoiser) -> list[str]:
    vocabulary = getattr(denoiser, "vocabulary", None)
    if vocabulary is not None and hasattr(vocabulary, "prompts"):
        return vocabulary.prompts()
    from ..candidates import word_list

    return [t.format(w) for w in word_list()[:WORDS] for t in WORD_TEMPLATES]


def shared_sae(where: str, base_fingerprint: str, block: str) -> tuple[SparseAutoencoder, Path] | None:
    """An SAE to reuse: `where` is one *.sae.safetensors file, or a folder searched for one trained on this base
    model and block. None where a folder holds none."""
    path = Path(where) if where else None
    if path is not None and path.is_file():
        sae, meta = load_sae(path)
        if meta.get("erasure.sae.block") != block:
            raise PatchError(f"{path.name} is an SAE of {meta.get('erasure.sae.block')}; this model's is {block}")
        return sae, path
    if path is None:
        return None
    return find_sae(path, {"erasure.base_fingerprint": base_fingerprint, "erasure.sae.block": block})


def run_sampler(denoiser: Denoiser, prompts: list[str], seeds: list[int], config: TrainConfig, chunk: int,
                done=None, cancel=None) -> None:
    """The sampler's UNet calls for each (prompt, seed), DDIM with CFG from per-seed noise, without decoding
    (a ComfyUI MODEL may come without a VAE): what the block hooks see."""
    empty = denoiser.encode([""])
    for i in range(0, len(prompts), chunk):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled after {i} of {len(prompts)} prompts")
        part = prompts[i:i + chunk]
        noise = seeded_noise(seeds[i:i + chunk], denoiser.sample_shape, denoiser.device)
        for _ in sample_trajectories(denoiser, denoiser.encode(part), empty, noise, config.cache_steps,
                                     config.cache_guidance):
            pass
        if done is not None:
            done(i + len(part))


def _report(progress, stage: str, total: int):
    return (lambda done, loss=None: progress(done, total, loss, stage=stage)) if progress else (lambda *a, **k: None)


def train_sae(denoiser: Denoiser, block: str, config: TrainConfig, progress=None, cancel=None
              ) -> tuple[SparseAutoencoder, dict]:
    """Stream the block's output over the training prompts (one seed each, config.cache_steps DDIM steps, both
    CFG halves) into an SAE trainer; one pass over the data."""
    module, prompts = denoiser.transformer_block(block), training_prompts(denoiser)
    width = denoiser.weight_shapes()[f"{block}.proj_out"][0]
    trainer = SAETrainer(width, EXPANSION, TOP_K, SAE_LR, SAE_BATCH, seed=config.seed)
    report, start, chunk = _report(progress, STAGE_SAE, len(prompts)), time.time(), max(1, config.batch)
    handles = hook_block(denoiser.network(), module, lambda t, rows: trainer.feed(rows))
    try:
        run_sampler(denoiser, prompts, [config.seed + i for i in range(len(prompts))], config, chunk, report, cancel)
    finally:
        for h in handles:
            h.remove()
    sae = trainer.finish()
    return sae, {"prompts": len(prompts), "seeds_per_prompt": 1, "sampler_steps": config.cache_steps,
                 "sae_steps": trainer.steps, "features": sae.features, "k": sae.k,
                 "seconds": round(time.time() - start, 1)}


def feature_means(denoiser: Denoiser, module, sae: SparseAutoencoder, prompts: list[str], seeds: int,
                  config: TrainConfig) -> torch.Tensor:
    collect = FeatureMeans(sae)
    handles = hook_block(denoiser.network(), module, collect)
    try:
        chosen = [SEED_OFFSET + config.seed + k for k in range(seeds)]
        run_sampler(denoiser, [p for p in prompts for _ in chosen], chosen * len(prompts), config,
                    max(1, config.batch) * 4)
    finally:
        for h in handles:
            h.remove()
    return collect.mean


def train_saeuron(denoiser: Denoiser, config: TrainConfig, *, cache=None, checkpoint=None, progress=None,
                  cancel=None) -> TrainResult:
    """`config.sae`: an SAE file or a folder to reuse one from; else the model's own `sae_folder` (the toy
    model ships its SAE); else one is trained. The patch carries its SAE, and save_patch writes it beside the
    patch unless that folder has it. `cache` and `checkpoint` are unused: no trajectories are cached."""
    block = default_block(denoiser)
    base = denoiser.fingerprint()
    found = shared_sae(config.sae, base, block) or shared_sae(str(getattr(denoiser, "sae_folder", "") or ""), base,
                                                              block)
    if found is not None:
        sae, source = found[0], found[1].name
        info = {"reused": source}
    else:
        sae, info = train_sae(denoiser, block, config, progress, cancel)
    module = denoiser.transformer_block(block)
    report = _report(progress, STAGE_SELECT, 2)
    report(0)
    concept = feature_means(denoiser, module, sae, config.concepts, CONCEPT_SEEDS, config)
    report(1)
    others = feature_means(denoiser, module, sae, [*config.preserve, ""], OTHER_SEEDS, config)
    report(2)
    features = select_features(concept, others, PER_BUCKET, MULTIPLIER)
    fingerprint = sae_fingerprint(sae)
    training = {"block": block, "per_bucket": PER_BUCKET, "multiplier": MULTIPLIER, "sae": info,
                "cache_steps": config.cache_steps, "cache_guidance": config.cache_guidance,
                "selected": int(features.selected.sum())}
    patch = ErasurePatch(layers=[], method=config.method, concepts=config.concepts, preserve=list(config.preserve),
                         base_model=getattr(denoiser, "name", ""), base_fingerprint=base, training=training,
                         seed=config.seed, extra={"sae": concept_tensors(features)},
                         feature_meta={"sae": {"block": block, "sae": fingerprint, "per_bucket": PER_BUCKET,
                                               "multiplier": MULTIPLIER}},
                         resolved={"sae": sae})
    return TrainResult(patch)


register(MethodSpec("saeuron", "edits sparse-autoencoder features of one block at generation time; no weights",
                    "Cywiński & Deja, SAeUron: Interpretable Concept Unlearning in Diffusion Models with Sparse "
                    "Autoencoders, ICML 2025", reconstruction=False, kind="inference-time",
                    trains="a sparse autoencoder (shared per base model) + the concept's features",
                    train=train_saeuron, delta_lr=None))
