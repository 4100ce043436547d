"""Sparse autoencoders on one UNet block's output, for SAeUron (Cywiński & Deja, ICML 2025).

Written from the paper and its description in shared/METHODS.md (no code copied):
- batch-TopK SAE (Bussmann et al. 2024): z = ReLU((x − b_dec)·W_enc + b_enc); in training only the k·N largest
  entries of the batch's N rows are kept; at inference every entry above θ, a moving average of the smallest
  kept entry in training (so about k per row); x̂ = z·W_dec + b_dec with unit-norm decoder rows;
- the activations are the block's output at every spatial position, over prompts, seeds and the sampler's
  timesteps, both halves of the CFG batch, streamed into a shuffling buffer rather than held in memory;
- feature scores per timestep bucket: μ_i(concept)/Σμ(concept) − μ_i(others)/Σμ(others);
- the edit: where a selected feature exceeds its mean on other prompts, it is set to multiplier × its mean on
  the concept; the result is decoded and the SAE's reconstruction error added back, so unselected features and
  whatever the SAE cannot represent pass through unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

TIME_BUCKETS = 10  # timestep buckets of 100 training timesteps each (t in [0, 1000))
THRESHOLD_DECAY = 0.99


def bucket_of(t: torch.Tensor, buckets: int = TIME_BUCKETS, train_steps: int = 1000) -> torch.Tensor:
    # rounded first: a host that derives t from sigma (ComfyUI) gives 899.9998 for the sampler's 900
    return (t.float().round() * buckets / train_steps).long().clamp(0, buckets - 1)


@dataclass
class SparseAutoencoder:
    w_enc: torch.Tensor  # (d, F)
    b_enc: torch.Tensor  # (F,)
    w_dec: torch.Tensor  # (F, d), rows of unit norm
    b_dec: torch.Tensor  # (d,)
    k: int
    threshold: float     # θ: inference keeps pre-activations above it
    _copies: dict = field(default_factory=dict, compare=False, repr=False)  # device -> this SAE there

    @property
    def features(self) -> int:
        return self.w_enc.shape[1]

    def on(self, device: torch.device) -> "SparseAutoencoder":
        """This SAE with its tensors on `device`, copied once per device (the model may sit on a GPU)."""
        if self.w_enc.device == device:
            return self
        if device not in self._copies:
            self._copies[device] = SparseAutoencoder(*(t.to(device) for t in self.tensors().values()), k=self.k,
                                                     threshold=self.threshold)
        return self._copies[device]

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu((x - self.b_dec) @ self.w_enc + self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pre(x)
        return z * (z > self.threshold)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.w_dec + self.b_dec

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w_enc": self.w_enc, "b_enc": self.b_enc, "w_dec": self.w_dec, "b_dec": self.b_dec}


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k·N largest entries of the (N, F) pre-activations; returns the codes and the smallest kept."""
    flat = pre.flatten()
    values, index = flat.topk(min(k * pre.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, index, values).view_as(pre), values[-1]


class SAETrainer:
    """Fits a batch-TopK SAE to rows fed as they come (`feed`, e.g. as the sink of block_outputs), so the
    activations are never all in memory: rows wait in a buffer of `buffer` batches, are shuffled, and trained
    on once; `finish()` trains on what is left and returns the SAE."""

    def __init__(self, dim: int, expansion: int = 16, k: int = 32, lr: float = 4e-4, batch: int = 4096,
                 buffer: int = 16, seed: int = 0, progress: Callable[[int, float], None] | None = None) -> None:
        self.g = torch.Generator().manual_seed(seed)
        features = dim * expansion
        w_dec = F.normalize(torch.randn(features, dim, generator=self.g), dim=1)
        self.params = {"w_enc": w_dec.T.clone(), "b_enc": torch.zeros(features), "w_dec": w_dec,
                       "b_dec": torch.zeros(dim)}
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimiser = torch.optim.Adam(self.params.values(), lr=lr)
        self.k, self.batch, self.buffer, self.progress = k, batch, buffer, progress
        self.held: list[torch.Tensor] = []
        self.size = self.steps = 0
        self.threshold = 0.0  # moving average of the smallest kept entry: early, untrained steps fade out

    def feed(self, rows: torch.Tensor) -> None:
        # outside inference mode (ComfyUI runs nodes inside it): an ordinary copy, and a step autograd can take
        with torch.inference_mode(False):
            self.held.append(rows.detach().reshape(-1, rows.shape[-1]).float().cpu().clone())
            self.size += len(self.held[-1])
            if self.size >= self.buffer * self.batch:
                self._train_held(keep_remainder=True)

    def _train_held(self, keep_remainder: bool) -> None:
        rows = torch.cat(self.held)
        rows = rows[torch.randperm(len(rows), generator=self.g)]
        cut = (len(rows) // self.batch) * self.batch if keep_remainder else len(rows)
        for i in range(0, cut, self.batch):
            self._step(rows[i:i + self.batch])
        self.held, self.size = [rows[cut:]], len(rows) - cut

    @torch.enable_grad()  # fed from inside a sampler, which runs under no_grad
    def _step(self, x: torch.Tensor) -> None:
        p = self.params
        if self.steps == 0:  # the decoder bias starts at the data's mean, as is usual
            with torch.no_grad():
                p["b_dec"].copy_(x.mean(0))
        z, kept = batch_topk(F.relu((x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]), self.k)
        loss = (z @ p["w_dec"] + p["b_dec"] - x).pow(2).sum(1).mean() / x.var(0).sum().clamp_min(1e-8)
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        with torch.no_grad():
            p["w_dec"].copy_(F.normalize(p["w_dec"], dim=1))
        self.steps += 1
        self.threshold += (float(kept.detach()) - self.threshold) * max(1 / self.steps, 1 - THRESHOLD_DECAY)
        if self.progress:
            self.progress(self.steps, float(loss))

    def finish(self) -> SparseAutoencoder:
        if self.size:
            with torch.inference_mode(False):
                self._train_held(keep_remainder=False)
        if not self.steps:
            raise ValueError("no activations to train the SAE on")
        p = self.params
        return SparseAutoencoder(*(p[n].detach().clone() for n in ("w_enc", "b_enc", "w_dec", "b_dec")), k=self.k,
                                 threshold=self.threshold)


def hook_block(unet: torch.nn.Module, block: torch.nn.Module,
               sink: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]) -> list:
    """Calls `sink(t, rows)` for each forward of `block` inside `unet`: t (B,) the UNet call's timesteps, rows
    (B, H·W, C) the block's output per spatial position. Rows the sink returns replace the block's output.
    `unet` is whatever the host calls with (x, t, ...): a diffusers UNet (`timestep`), or the LDM UNetModel of
    ComfyUI, A1111 and Forge (`timesteps`), which take the timestep, not ComfyUI's sigma. Returns the hook
    handles."""
    current: list[torch.Tensor] = []

    def timestep(_module, args, kwargs):
        t = kwargs.get("timestep", kwargs.get("timesteps", args[1] if len(args) > 1 else None))
        current[:] = [torch.as_tensor(t).flatten()]

    return [unet.register_forward_pre_hook(timestep, with_kwargs=True),
            block.register_forward_hook(output_hook(sink, lambda: current[0] if current else torch.zeros(1)))]


def output_hook(sink: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
                timestep: Callable[[], torch.Tensor]):
    """A block's forward hook calling `sink(t, rows)` with t = timestep() (see hook_block)."""
    def hook(_module, _args, out):
        h = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        t = torch.as_tensor(timestep()).flatten()
        b, c, height, width = h.shape
        # not detached: an edit stays differentiable (attacks and training on top of a patch go through it)
        rows = sink(t.expand(b) if t.numel() == 1 else t, h.flatten(2).transpose(1, 2))
        if rows is None:
            return None
        new = rows.transpose(1, 2).reshape(b, c, height, width).to(h.dtype)
        if isinstance(out, torch.Tensor):  # LDM spatial transformers (ComfyUI, A1111, Forge)
            return new
        return (new, *out[1:]) if isinstance(out, tuple) else type(out)(sample=new)  # diffusers
    return hook


@contextmanager
def block_outputs(unet: torch.nn.Module, block: torch.nn.Module,
                  sink: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]):
    """hook_block while the context is open."""
    handles = hook_block(unet, block, sink)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class ConceptFeatures:
    """The SAE features that carry one concept, per timestep bucket, and what the edit sets them to."""

    selected: torch.Tensor      # (buckets, F) bool
    concept_mean: torch.Tensor  # (buckets, F): mean activation on the concept's prompts
    other_mean: torch.Tensor    # (buckets, F): mean activation on the other prompts
    multiplier: float           # −1 for styles in the paper; objects −1 to −30


class FeatureMeans:
    """Running per-bucket means of SAE codes: feed it block rows (sink of block_outputs), read `mean`."""

    def __init__(self, sae: SparseAutoencoder, buckets: int = TIME_BUCKETS, conditional_half: bool = True) -> None:
        self.sae, self.half = sae, conditional_half
        self.sums, self.counts = torch.zeros(buckets, sae.features), torch.zeros(buckets)

    def __call__(self, t: torch.Tensor, rows: torch.Tensor) -> None:
        if self.half:  # the CFG batch is [unconditional; conditional]: the prompt's own rows are the second half
            t, rows = t[len(t) // 2:], rows[len(rows) // 2:]
        z = self.sae.encode(rows.detach().float())  # (B, P, F)
        b = bucket_of(t.cpu())
        self.sums.index_add_(0, b, z.sum(1).cpu())
        self.counts.index_add_(0, b, torch.full((len(b),), float(z.shape[1])))

    @property
    def mean(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)[:, None]


def select_features(concept: torch.Tensor, other: torch.Tensor, per_bucket: int, multiplier: float
                    ) -> ConceptFeatures:
    """The `per_bucket` features whose share of the concept's activation most exceeds their share of the
    others' (the paper's score), per bucket; only features with a positive score."""
    score = concept / concept.sum(1, keepdim=True).clamp_min(1e-12) - other / other.sum(1, keepdim=True).clamp_min(
        1e-12)
    top = score.topk(per_bucket, dim=1)
    selected = torch.zeros_like(score, dtype=torch.bool).scatter(1, top.indices, top.values > 0)
    return ConceptFeatures(selected, concept, other, multiplier)


def edit(sae: SparseAutoencoder, features: ConceptFeatures, rows: torch.Tensor, t: torch.Tensor,
         strength: float = 1.0) -> torch.Tensor:
    """The block's rows (B, P, C) with the concept's features replaced, at timesteps t (B,). Strength s blends
    the edited features with their own values: s·edit + (1 − s)·z, so 0 returns the rows unchanged."""
    x, sae = rows.float(), sae.on(rows.device)
    z = sae.encode(x)
    b = bucket_of(t.to(rows.device))
    on = features.selected.to(rows.device)[b][:, None] & (z > features.other_mean.to(rows.device)[b][:, None])
    target = features.multiplier * features.concept_mean.to(rows.device)[b][:, None].expand_as(z)
    z_edit = torch.where(on, strength * target + (1 - strength) * z, z)
    # decode(z_edit) + (x − decode(z)), written so that rows no feature changes in come back exactly
    return (x + (z_edit - z) @ sae.w_dec).to(rows.dtype)


def edit_all(edits: list[tuple[SparseAutoencoder, ConceptFeatures, float]]):
    """A hook_block sink applying several patches' edits in turn (each (sae, features, strength))."""
    def sink(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        for sae, features, strength in edits:
            rows = edit(sae, features, rows, t, strength)
        return rows
    return sink


# -- the patch feature and the shared SAE file ---------------------------------------------------------------
#
# A SAeUron patch carries only the concept's part: per timestep bucket, which features to edit (`selected`),
# what to set them to (`target` = multiplier × concept mean) and above which level (`floor`, their mean on
# other prompts), as `erasure.sae.*` tensors, and in erasure.features["sae"] the block and the SAE's
# fingerprint. The SAE itself, tens of MB at SD1.5 size, is one `*.sae.safetensors` file per base model and
# block, in the same folder as the patches that use it, found by fingerprint.

SAE_SUFFIX = ".sae.safetensors"
_SAE_KEYS = ("w_enc", "b_enc", "w_dec", "b_dec")
_BLOCK = re.compile(r"(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)")
_HEX16 = re.compile(r"[0-9a-f]{16}")


def sae_fingerprint(sae: SparseAutoencoder) -> str:
    digest = hashlib.sha256(f"{sae.k}:{sae.threshold!r}".encode())
    for key in _SAE_KEYS:
        digest.update(getattr(sae, key).detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def concept_tensors(features: ConceptFeatures) -> dict[str, torch.Tensor]:
    """A patch's `erasure.sae.*` tensors for `features`."""
    on = features.selected.float()
    return {"erasure.sae.selected": on, "erasure.sae.target": features.multiplier * features.concept_mean * on,
            "erasure.sae.floor": features.other_mean * on}


def patch_features(patch) -> ConceptFeatures:
    """The ConceptFeatures a SAeUron patch carries (the target already holds the multiplier)."""
    t = patch.extra["sae"]
    return ConceptFeatures(t["erasure.sae.selected"] > 0.5, t["erasure.sae.target"].float(),
                           t["erasure.sae.floor"].float(), 1.0)


def sae_file_name(base_fingerprint: str, block: str, fingerprint: str) -> str:
    return f"{base_fingerprint or 'model'}-{block}-{fingerprint[:8]}{SAE_SUFFIX}"


def save_sae(sae: SparseAutoencoder, path: Path, block: str, base_fingerprint: str = "",
             info: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"erasure.kind": "sae", "erasure.sae.block": block, "erasure.sae.k": str(sae.k),
            "erasure.sae.threshold": repr(float(sae.threshold)), "erasure.sae.fingerprint": sae_fingerprint(sae),
            "erasure.base_fingerprint": base_fingerprint, "erasure.sae.info": json.dumps(info or {})}
    save_file({k: getattr(sae, k).detach().float().contiguous().cpu() for k in _SAE_KEYS}, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def load_sae(path: Path) -> tuple[SparseAutoencoder, dict[str, str]]:
    """Load and check a `*.sae.safetensors` file (bounded header, no pickles, shapes, finiteness, fingerprint)."""
    from safetensors import safe_open

    from .patch import PatchError, _read_header

    header, meta = _read_header(path)
    if meta.get("erasure.kind") != "sae" or set(header) != set(_SAE_KEYS):
        raise PatchError(f"{path.name} is not a sparse autoencoder file (erasure.kind sae, tensors "
                         f"{', '.join(_SAE_KEYS)})")
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k).float() for k in _SAE_KEYS}
    d, n = t["w_enc"].shape if t["w_enc"].dim() == 2 else (0, 0)
    if not (d and t["b_enc"].shape == (n,) and t["w_dec"].shape == (n, d) and t["b_dec"].shape == (d,)):
        raise PatchError(f"{path.name}: the SAE's tensors do not fit together (w_enc {tuple(t['w_enc'].shape)})")
    if not all(torch.isfinite(v).all() for v in t.values()):
        raise PatchError(f"{path.name}: the SAE contains NaN or Inf values")
    try:
        k, threshold = int(meta.get("erasure.sae.k", "")), float(meta.get("erasure.sae.threshold", ""))
    except ValueError:
        raise PatchError(f"{path.name}: erasure.sae.k / threshold are not numbers") from None
    if not (0 < k <= n and math.isfinite(threshold)) or not _BLOCK.fullmatch(meta.get("erasure.sae.block", "")):
        raise PatchError(f"{path.name}: bad SAE settings (k, threshold or block)")
    sae = SparseAutoencoder(t["w_enc"], t["b_enc"], t["w_dec"], t["b_dec"], k=k, threshold=threshold)
    if sae_fingerprint(sae) != meta.get("erasure.sae.fingerprint"):
        raise PatchError(f"{path.name}: the SAE's tensors do not match its fingerprint (a damaged or edited file)")
    return sae, meta


_LOADED: dict[tuple, SparseAutoencoder] = {}  # (path, size, mtime) -> SAE: every patch of a folder shares one


def find_sae(folder: Path, match: dict[str, str]) -> tuple[SparseAutoencoder, Path] | None:
    """The first of `folder`'s *.sae.safetensors files whose metadata has every entry of `match` (for example
    {"erasure.sae.fingerprint": fp}), loaded and checked; only headers are read until one matches."""
    from .patch import PatchError, _read_header

    for path in sorted(Path(folder).glob(f"*{SAE_SUFFIX}")) if Path(folder).is_dir() else []:
        try:
            meta = _read_header(path)[1]
        except PatchError:
            continue
        if any(meta.get(k) != v for k, v in match.items()):
            continue
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _LOADED:
            _LOADED[key] = load_sae(path)[0]
        return _LOADED[key], path
    return None


def _validate_feature(tensors: dict[str, torch.Tensor], patch, name: str) -> None:
    from .patch import PatchError

    meta = patch.feature_meta.get("sae")
    if not isinstance(meta, dict) or not _BLOCK.fullmatch(str(meta.get("block", ""))) \
            or not _HEX16.fullmatch(str(meta.get("sae", ""))):
        raise PatchError(f"{name}: erasure.features sae must name the block (an LDM path such as "
                         "output_blocks.4.1) and the SAE's fingerprint (16 hex digits)")
    keys = {"erasure.sae.selected", "erasure.sae.target", "erasure.sae.floor"}
    if set(tensors) != keys:
        raise PatchError(f"{name}: the sae feature needs exactly {', '.join(sorted(keys))}")
    shapes = {t.shape for t in tensors.values()}
    if len(shapes) != 1 or tensors["erasure.sae.selected"].dim() != 2:
        raise PatchError(f"{name}: sae tensors must all be (buckets x features)")
    if not ((tensors["erasure.sae.selected"] == 0) | (tensors["erasure.sae.selected"] == 1)).all():
        raise PatchError(f"{name}: erasure.sae.selected holds values other than 0 and 1")


def _resolve(patch, folder: Path, name: str) -> None:
    from .patch import PatchError

    meta = patch.feature_meta["sae"]
    found = find_sae(folder, {"erasure.sae.fingerprint": meta["sae"]})
    if found is None:
        raise PatchError(f"{name} needs its sparse autoencoder (fingerprint {meta['sae']}, block {meta['block']}), "
                         f"a *{SAE_SUFFIX} file that is not in {folder}; put it beside the patch (one SAE serves "
                         "every SAeUron patch of a base model)")
    sae = found[0]
    if patch.extra["sae"]["erasure.sae.selected"].shape[1] != sae.features:
        raise PatchError(f"{name}: selects among {patch.extra['sae']['erasure.sae.selected'].shape[1]} features, "
                         f"its SAE has {sae.features}")
    patch.resolved["sae"] = sae


def _write_beside(patch, folder: Path) -> None:
    from .patch import PatchError

    sae, meta = patch.resolved.get("sae"), patch.feature_meta["sae"]
    if sae is None:
        raise PatchError("a SAeUron patch is saved with its SAE, and this one has none")
    if find_sae(folder, {"erasure.sae.fingerprint": meta["sae"]}) is None:
        save_sae(sae, folder / sae_file_name(patch.base_fingerprint, meta["block"], meta["sae"]), meta["block"],
                 patch.base_fingerprint)


def _register() -> None:
    from .patch import KNOWN_FEATURES, register_feature

    if "sae" not in KNOWN_FEATURES:
        register_feature("sae", r"erasure\.sae\.(selected|target|floor)", _validate_feature, _resolve, _write_beside)


_register()
