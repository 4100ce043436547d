"""The training engine: one loop for every method, over the denoiser protocol.

The frozen model's DDIM trajectories for the erased prompt are sampled once and
cached (x_t, t, ε*(x_t, ∅), ε*(x_t, c_e), ε*(x_t, c_a)); each training step then
costs one forward and one backward pass of the trainable model. The trainable
parts are concept-memory tokens and/or weight deltas, attached through
the same injection the product uses, so a trained patch behaves exactly as it did
in training. The user's weights are never touched.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .denoiser import CacheRecord, Conditioning, Denoiser, patched, sample_trajectories
from .injection import recomputed_transformer_blocks
from .layers import select_layers
from .patch import ConceptMemory, ErasurePatch, WeightDelta
from .sampling import seeded_noise


class Cancelled(Exception):
    """Raised when the caller's cancel check says stop; the last checkpoint stays usable."""


# progress(done, total, loss, stage=...): every phase of a run reports, so a host's bar moves from the start
Progress = Callable[..., None]
CACHE_STAGE = "sampling the frozen model's trajectories"
ANCHOR_STAGE = "the preserved prompts' anchors"
TRAIN_STAGE = "training"


@dataclass
class TrainConfig:
    concept: str                 # the prompt erased; with `more_concepts`, the first of several
    method: str = "esd-x"
    alternative: str = ""
    preserve: list[str] = field(default_factory=list)
    steps: int = 200
    lr: float | None = None      # weight deltas' learning rate; None: the method's (its MethodSpec.delta_lr)
    memory_lr: float | None = None  # memory tokens' learning rate; None: the method's (MethodSpec.memory_lr)
    tokens: int = 8
    layers: str | list[str] = "all"
    seed: int = 0
    eta: float = 1.0             # ESD negative-guidance strength
    batch: int = 8
    cache_seeds: int = 8         # trajectories sampled once from the frozen model
    cache_steps: int = 25        # DDIM steps per trajectory
    cache_guidance: float = 3.0  # CFG scale of the sampler (ESD uses 3)
    preserve_weight: float = 1.0  # weight of the preservation term, when `preserve` names prompts
    projections: str = ""        # attn2 projections the deltas train: "all", "kv" (to_k, to_v); "" = the method's
    gradient_checkpointing: bool = False  # recompute the UNet's transformer blocks in backward: less memory, slower
    cache_on_cpu: bool = False   # keep the trajectory cache in RAM, moving each batch to the model's device
    candidate_exclude: list[str] = field(default_factory=list)  # words a candidate search may not pick (the
    # benchmark's held-out concepts, so that held-out stays held out)
    more_concepts: list[str] = field(default_factory=list)  # further prompts the same patch erases
    sae: str = ""  # SAeUron: a *.sae.safetensors file, or a folder to reuse one from (else one is trained)

    @property
    def concepts(self) -> list[str]:
        """Every prompt the patch erases, the first being `concept`."""
        return [self.concept, *self.more_concepts]

    @property
    def delta_lr(self) -> float | None:
        """The weight deltas' learning rate: `lr`, or the method's default when it is None (None for a method
        that has no such rate, as a closed-form one)."""
        return self.lr if self.lr is not None else _method_default(self.method, "delta_lr")

    @property
    def memory_rate(self) -> float | None:
        """The memory tokens' learning rate: `memory_lr`, or the method's default when it is None."""
        return self.memory_lr if self.memory_lr is not None else _method_default(self.method, "memory_lr")


def _method_default(method: str, name: str) -> float | None:
    from .methods import get_method  # the registry imports the engine, so look it up at call time

    return getattr(get_method(method), name)


class TrajectoryCache:
    """Frozen-model trajectories for the erased prompt, flattened over seeds and steps.

    The tensors live on `storage` (the model's device, or the CPU when asked, to spare GPU memory); `draw`
    hands each batch to `device`, the model's."""

    def __init__(self, records: list[CacheRecord], device=None, storage=None) -> None:
        def cat(name: str) -> torch.Tensor | None:
            parts = [getattr(r, name) for r in records]
            return None if parts[0] is None else torch.cat(parts).to(storage or parts[0].device)

        self.x_t, self.t = cat("x_t"), cat("t")
        self.eps_uncond, self.eps_concept, self.eps_alternative = cat("eps_uncond"), cat("eps_concept"), \
            cat("eps_alternative")
        self.concept_index = cat("concept_index")
        self.eps_preserve: torch.Tensor | None = None
        self.preserved: list[str] = []  # the prompts eps_preserve was computed for, in order
        self.device = torch.device(device) if device is not None else self.x_t.device

    def __len__(self) -> int:
        return len(self.x_t)

    FIELDS = ("x_t", "t", "eps_uncond", "eps_concept", "eps_alternative", "eps_preserve", "concept_index")

    def save(self, path: Path) -> None:
        """Beside a run's checkpoint, so that a resumed run does not sample the trajectories again."""
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"tensors": {k: getattr(self, k).cpu() for k in self.FIELDS if getattr(self, k) is not None},
                    "preserved": self.preserved}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, device, storage=None) -> "TrajectoryCache":
        state = torch.load(path, map_location="cpu", weights_only=True)
        cache = cls.__new__(cls)
        for k in cls.FIELDS:
            value = state["tensors"].get(k)
            setattr(cache, k, None if value is None else value.to(storage or device))
        cache.preserved = list(state["preserved"])
        cache.device = torch.device(device)
        return cache

    @classmethod
    def build(cls, denoiser: Denoiser, concept: Conditioning, empty: Conditioning, seeds: list[int], steps: int,
              guidance: float, alternative: Conditioning | None = None,
              progress: Callable[[int, int], None] | None = None, storage=None) -> "TrajectoryCache":
        """Trajectories from `seeds` for each erased prompt (each row of `concept`), one after the other; every
        record says whose it is (`concept_index`), so a patch erasing several concepts trains in one loop."""
        noise = seeded_noise(seeds, denoiser.sample_shape, denoiser.device)
        records = []
        for k in range(len(concept)):
            row = concept.select(slice(k, k + 1))
            bar = (lambda done, total, k=k: progress(k * total + done, len(concept) * total)) if progress else None
            for r in sample_trajectories(denoiser, row, empty, noise, steps, guidance, alternative, bar):
                r.concept_index = torch.full((len(r.x_t),), k, dtype=torch.long, device=r.x_t.device)
                records.append(_moved(r, storage))
        return cls(records, denoiser.device, storage)

    @torch.no_grad()
    def add_preserved(self, denoiser: Denoiser, preserved: Conditioning, batch: int = 64,
                      progress: Progress | None = None) -> None:
        """Record the frozen model's ε*(x_t, c_r) for every preserved prompt at every cached x_t: the anchors of
        the preservation term, computed once like the rest of the cache."""
        per_prompt = []
        for r in range(len(preserved)):
            if progress:
                progress(r, len(preserved), None, stage=ANCHOR_STAGE)
            cond = preserved.select(slice(r, r + 1))
            per_prompt.append(torch.cat([denoiser.predict_noise(self.x_t[i:i + batch].to(self.device),
                                                                self.t[i:i + batch].to(self.device),
                                                                cond.expand(len(self.x_t[i:i + batch])))
                                         .to(self.x_t.device) for i in range(0, len(self), batch)]))
        self.eps_preserve = torch.stack(per_prompt, dim=1)
        if progress:
            progress(len(preserved), len(preserved), None, stage=ANCHOR_STAGE)

    def draw(self, n: int, generator: torch.Generator) -> CacheRecord:
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return _moved(CacheRecord(self.x_t[idx], self.t[idx], self.eps_uncond[idx], self.eps_concept[idx],
                                  _pick(self.eps_alternative, idx), _pick(self.eps_preserve, idx),
                                  _pick(self.concept_index, idx)), self.device)


def _pick(tensor: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor[idx]


def _moved(record: CacheRecord, device) -> CacheRecord:
    """The record on `device` (None: where it is)."""
    if device is None:
        return record
    return CacheRecord(*(None if t is None else t.to(device) for t in
                         (record.x_t, record.t, record.eps_uncond, record.eps_concept, record.eps_alternative,
                          record.eps_preserve, record.concept_index)))


class ResamplingSource:
    """ESD's original data path, kept as the reference the cache is measured against: every draw runs the frozen
    sampler afresh from new noise to a random step k of `steps` and returns that step's record (k + 1 sampler
    steps per training step). Same `draw` interface as TrajectoryCache; no preservation anchors."""

    eps_preserve = None

    def __init__(self, denoiser: Denoiser, concept: Conditioning, empty: Conditioning, steps: int, guidance: float,
                 alternative: Conditioning | None = None) -> None:
        self.denoiser, self.concept, self.empty, self.alternative = denoiser, concept, empty, alternative
        self.steps, self.guidance = steps, guidance

    def draw(self, n: int, generator: torch.Generator) -> CacheRecord:
        k = int(torch.randint(0, self.steps, (1,), generator=generator))
        noise = torch.randn((n, *self.denoiser.sample_shape), generator=generator).to(self.denoiser.device)
        records = sample_trajectories(self.denoiser, self.concept, self.empty, noise, self.steps, self.guidance,
                                      self.alternative)
        for i, record in enumerate(records):
            if i == k:
                records.close()
                return record
        raise AssertionError("unreachable: k < steps")


class TrainableParts:
    """Memory tokens and weight deltas being trained, viewable as an ErasurePatch at any time."""

    def __init__(self, layers: list[str], delta_modules: list[str], context_dim: int, tokens: int,
                 weight_shapes: dict[str, tuple[int, ...]], generator: torch.Generator, device) -> None:
        self.layers = layers  # where the memory goes
        self.memory = None
        if tokens:
            # small random keys; values start at zero so the untrained memory contributes nothing
            k = 0.1 * torch.randn(tokens, context_dim, generator=generator)
            self.memory = ConceptMemory(torch.nn.Parameter(k.to(device)),
                                        torch.nn.Parameter(torch.zeros(tokens, context_dim, device=device)))
        self.deltas = {module: torch.nn.Parameter(torch.zeros(weight_shapes[module], device=device))
                       for module in delta_modules}
        self.extra: dict[str, torch.nn.Parameter] = {}  # a method's own trained state (an adversary's logits)

    def memory_params(self) -> list[torch.nn.Parameter]:
        return [self.memory.k, self.memory.v] if self.memory else []

    def delta_params(self) -> list[torch.nn.Parameter]:
        return list(self.deltas.values())

    def patch(self, with_memory: bool = True, with_deltas: bool = True, frozen: tuple[str, ...] = ()) -> ErasurePatch:
        """A live view of the trained parts: tensors shared, so it follows every update. Parts named in
        `frozen` ("memory", "deltas") are detached, so a loss through this view trains only the others."""
        memory = self.memory if with_memory else None
        if memory is not None and "memory" in frozen:
            memory = ConceptMemory(memory.k.detach(), memory.v.detach())
        deltas = {k: WeightDelta(full=v.detach() if "deltas" in frozen else v) for k, v in self.deltas.items()}
        return ErasurePatch(layers=self.layers, memory=memory, deltas=deltas if with_deltas else {})

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"delta.{k}": v.detach().clone() for k, v in self.deltas.items()}
        if self.memory:
            out["memory.k"], out["memory.v"] = self.memory.k.detach().clone(), self.memory.v.detach().clone()
        out.update({f"extra.{k}": v.detach().clone() for k, v in self.extra.items()})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.deltas.items():
                v.copy_(state[f"delta.{k}"])
            if self.memory:
                self.memory.k.copy_(state["memory.k"])
                self.memory.v.copy_(state["memory.v"])
            for k, v in self.extra.items():
                v.copy_(state[f"extra.{k}"])


def predict_with(denoiser: Denoiser, parts: ErasurePatch | None, x: torch.Tensor, t: torch.Tensor,
                 cond: Conditioning) -> torch.Tensor:
    """ε of the model with `parts` attached (or of the frozen model when None)."""
    if parts is None or (parts.memory is None and not parts.deltas and not parts.extra):
        return denoiser.predict_noise(x, t, cond)
    with patched(denoiser, [(parts, 1.0)]):
        return denoiser.predict_noise(x, t, cond)


def finish_patch(denoiser: Denoiser, parts: TrainableParts, config: TrainConfig, include_memory: bool = True,
                 include_deltas: bool = True, metrics: dict | None = None) -> ErasurePatch:
    """A detached, storable patch with full metadata."""
    live = parts.patch(include_memory, include_deltas)
    memory = None
    if live.memory is not None:
        memory = ConceptMemory(live.memory.k.detach().clone().cpu(), live.memory.v.detach().clone().cpu())
    deltas = {k: WeightDelta(full=d.full.detach().clone().cpu()) for k, d in live.deltas.items()
              if d.full.abs().max() > 0}
    training = {k: v for k, v in asdict(config).items()
                if k not in ("concept", "alternative", "preserve", "seed", "lr", "memory_lr", "candidate_exclude",
                             "more_concepts", "sae")}
    for key, rate, used in (("lr", config.delta_lr, parts.deltas), ("memory_lr", config.memory_rate, parts.memory)):
        if used and rate is not None:
            training[key] = rate
    return ErasurePatch(layers=parts.layers if memory is not None else [], memory=memory, deltas=deltas,
                        method=config.method, concepts=config.concepts, alternative=config.alternative,
                        preserve=list(config.preserve), base_model=getattr(denoiser, "name", ""),
                        base_fingerprint=denoiser.fingerprint(), training=training, seed=config.seed,
                        metrics=metrics or {})


def run_training(denoiser: Denoiser, config: TrainConfig, parts: TrainableParts, cache: TrajectoryCache,
                 step_loss: Callable[[int, CacheRecord], torch.Tensor],
                 param_groups: list[dict], checkpoint: Path | None = None,
                 progress: Progress | None = None,
                 cancel: Callable[[], bool] | None = None, checkpoint_seconds: float = 60.0) -> list[float]:
    """The loop every method shares: draw from the cache, take a step, checkpoint, report, honour cancel.

    A run resumed from its checkpoint continues with the same optimiser state and random stream, so it ends
    where an uninterrupted run with the same seed would."""
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(param_groups)
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        parts.load_state(state["parts"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        losses, start = list(state["losses"]), int(state["step"])

    def save(step: int) -> None:
        tmp = checkpoint.with_name(checkpoint.name + ".tmp")
        torch.save({"parts": parts.state(), "optimiser": optimiser.state_dict(), "generator": generator.get_state(),
                    "losses": losses, "step": step}, tmp)
        tmp.replace(checkpoint)
        if step < config.steps and isinstance(cache, TrajectoryCache) and not cache_path(checkpoint).exists():
            cache.save(cache_path(checkpoint))

    last_save = time.time()
    for step in range(start, config.steps):
        if cancel is not None and cancel():
            if checkpoint is not None:
                save(step)
            raise Cancelled(f"cancelled at step {step}")
        batch = cache.draw(config.batch, generator)
        with recomputed_transformer_blocks(denoiser.network()) if config.gradient_checkpointing else nullcontext():
            loss = step_loss(step, batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, config.steps, losses[-1], stage=TRAIN_STAGE)
        if checkpoint is not None and (time.time() - last_save > checkpoint_seconds or step + 1 == config.steps):
            save(step + 1)
            last_save = time.time()
    return losses


PLACEMENT_FIELDS = ("cache_on_cpu",)  # where tensors live, not what is trained: a run resumes across them


def checkpoint_path(folder: Path, config: TrainConfig, fingerprint: str, extra: str = "") -> Path:
    """Where a run leaves its state: named by everything that determines the run, so the same run started again
    resumes from it and any other run starts afresh."""
    settings = {k: v for k, v in asdict(config).items() if k not in PLACEMENT_FIELDS}
    key = json.dumps([settings, fingerprint, extra], sort_keys=True, default=str)
    return Path(folder) / f"train_{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def setup(denoiser: Denoiser, config: TrainConfig, tokens: int, projections: tuple[str, ...] = (),
          delta_layers: str | list[str] = "all", delta_modules: list[str] | None = None) -> TrainableParts:
    """Trainable parts: `tokens` memory tokens in config.layers, and deltas of the attn2 `projections` in
    `delta_layers`, or of the named `delta_modules` (canonical module paths, any linear or conv layer)."""
    names = denoiser.layer_names()
    if delta_modules is None:
        layers = select_layers(names, delta_layers) if projections else []
        delta_modules = [f"{layer}.{proj}" for layer in layers for proj in projections]
        shapes = {k: tuple(w.shape) for k, w in denoiser.projection_weights().items()}
    else:
        shapes = denoiser.weight_shapes()
    return TrainableParts(select_layers(names, config.layers), delta_modules, denoiser.context_dim, tokens, shapes,
                          torch.Generator().manual_seed(config.seed + 1), denoiser.device)


def cache_path(checkpoint: Path) -> Path:
    """Where a run's trajectory cache waits beside its checkpoint."""
    return checkpoint.with_name(checkpoint.stem + ".cache.pt")


def discard_checkpoint(checkpoint: Path | None) -> None:
    """A finished run's checkpoint and cache are no longer needed."""
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
        cache_path(checkpoint).unlink(missing_ok=True)


def concept_cache(denoiser: Denoiser, config: TrainConfig, concept: Conditioning, empty: Conditioning,
                  alternative: Conditioning | None = None, checkpoint: Path | None = None,
                  progress: Progress | None = None) -> TrajectoryCache:
    """The frozen model's trajectories for the run: the interrupted run's own cache when one waits beside
    `checkpoint` (the checkpoint's name already fixes every setting the cache depends on), else sampled now."""
    storage = "cpu" if config.cache_on_cpu else None
    if checkpoint is not None and cache_path(checkpoint).exists():
        return TrajectoryCache.load(cache_path(checkpoint), denoiser.device, storage)
    seeds = list(range(config.seed, config.seed + config.cache_seeds))
    bar = (lambda done, total: progress(done, total, None, stage=CACHE_STAGE)) if progress else None
    if bar:
        bar(0, len(concept) * config.cache_steps)
    return TrajectoryCache.build(denoiser, concept, empty, seeds, config.cache_steps, config.cache_guidance,
                                 alternative, bar, storage)


PROJECTION_SETS = {"all": ("to_q", "to_k", "to_v", "to_out.0"), "kv": ("to_k", "to_v")}


def projections_of(config: TrainConfig, default: str) -> tuple[str, ...]:
    name = config.projections or default
    if name not in PROJECTION_SETS:
        raise ValueError(f"unknown projection set {name!r}; use one of {', '.join(PROJECTION_SETS)}")
    return PROJECTION_SETS[name]


def preserved_prompts(denoiser: Denoiser, config: TrainConfig, cache: TrajectoryCache,
                      progress: Progress | None = None) -> Conditioning | None:
    """The preserved prompts' conditioning, making sure the cache holds their anchors; None without any."""
    if not config.preserve:
        return None
    preserved = denoiser.encode(list(config.preserve))
    if cache.eps_preserve is None or cache.preserved != list(config.preserve):  # other prompts: other anchors
        cache.add_preserved(denoiser, preserved, progress=progress)
        cache.preserved = list(config.preserve)
    return preserved


@dataclass
class Run:
    """What a trained method on attn2 deltas starts from: the erased and empty prompts' conditioning, the cache,
    the preserved prompts (None without any) and the trainable parts."""

    concept: Conditioning
    empty: Conditioning
    cache: TrajectoryCache
    preserved: Conditioning | None
    parts: TrainableParts


def start_attn2_run(denoiser: Denoiser, config: TrainConfig, default_projections: str,
                    cache: TrajectoryCache | None = None, checkpoint: Path | None = None,
                    progress: Progress | None = None) -> Run:
    """Encode, build (or reuse) the cache and the preserved prompts' anchors, and set up deltas of the attn2
    projections (`config.projections`, else `default_projections`) in `config.layers`, with no memory."""
    concept, empty = denoiser.encode(config.concepts), denoiser.encode([""])
    cache = cache or concept_cache(denoiser, config, concept, empty, checkpoint=checkpoint, progress=progress)
    preserved = preserved_prompts(denoiser, config, cache, progress)
    parts = setup(denoiser, config, tokens=0, projections=projections_of(config, default_projections),
                  delta_layers=config.layers)
    return Run(concept, empty, cache, preserved, parts)


def erased_prompts(concept: Conditioning, batch: CacheRecord) -> Conditioning:
    """The erased prompt of each record of the batch: `concept` holds one row per erased concept, and a record
    made from the k-th one's trajectories gets row k."""
    if len(concept) == 1 or batch.concept_index is None:
        return concept.expand(len(batch.x_t))
    return concept.select(batch.concept_index.to(concept.context.device))


def esd_target(batch: CacheRecord, eta: float) -> torch.Tensor:
    """ESD's negatively guided target y = ε*(x_t, ∅) − η·(ε*(x_t, c_e) − ε*(x_t, ∅)), shared by ESD and memory."""
    return batch.eps_uncond - eta * (batch.eps_concept - batch.eps_uncond)


def preservation_loss(denoiser: Denoiser, view: ErasurePatch, batch: CacheRecord, preserved: Conditioning | None,
                      step: int) -> torch.Tensor | float:
    """‖ε_θ(x_t, c_r) − ε*(x_t, c_r)‖² on the cached x_t, one preserved prompt per sample, rotating with the
    step so that every prompt is seen (our choice: anchors at the erased prompt's x_t cost no extra sampling)."""
    if preserved is None or batch.eps_preserve is None:
        return 0.0
    n, count = len(batch.x_t), len(preserved)
    which = (torch.arange(n) + step) % count
    cond = preserved.select(which)
    pred = predict_with(denoiser, view, batch.x_t, batch.t, cond)
    return F.mse_loss(pred, batch.eps_preserve[torch.arange(n), which])
