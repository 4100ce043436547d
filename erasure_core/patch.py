"""The erasure patch: what users train, apply, stack and share. Format version 2 (docs/patch-format.md).

One safetensors file holds
- concept memory: `erasure.memory.k` / `erasure.memory.v` (m x d, shared by all its layers), or
  `erasure.memory.<layer>.k` / `.v` per layer;
- optional weight deltas under kohya keys, full (`lora_unet_<ldm path>.diff`) or low rank
  (`.lora_down.weight`, `.lora_up.weight`, `.alpha`), so the delta part loads in the stock LoRA loaders of
  ComfyUI, A1111 and Forge. Most methods change cross-attention projections only; ESD-u changes the linear and
  conv layers outside cross-attention;
- metadata (str -> str): `modelspec.*` and `erasure.*`, among them `erasure.requires`, the features (kinds of
  tensor, KNOWN_FEATURES) the file needs. A reader loads any version whose features it knows and names the
  ones it does not; a later method adds a feature with `register_feature` (docs/patch-format.md).

Patches come from strangers, so loading never unpickles, bounds the header before
parsing it, and validates every key, dtype, shape and value.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .layers import (attn2_layers, base_layer, from_kohya_module, is_attn2_projection, is_canonical_layer,
                     is_canonical_module, kohya_prefix, layer_of)

FORMAT_VERSION = "2"  # 2 = 1 + erasure.requires; readers go by erasure.requires, not by this number
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a patch header is a few KB; anything near this is hostile or broken
ALLOWED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
ARCHITECTURES = {768: "stable-diffusion-v1", 1024: "stable-diffusion-v2-768-v", 2048: "stable-diffusion-xl-v1-base"}

_SHARED_K, _SHARED_V = "erasure.memory.k", "erasure.memory.v"
_LAYER_MEMORY = re.compile(r"^erasure\.memory\.(.+attn2)\.(k|v)$")
_DELTA = re.compile(r"^(lora_unet_\w+?)\.(diff|lora_down\.weight|lora_up\.weight|alpha)$")


class PatchError(ValueError):
    """A patch file that cannot be used, with a one-line reason."""


@dataclass(frozen=True)
class Feature:
    """A kind of tensor a patch can carry: the tensor keys it owns (`keys.fullmatch`) and, for a feature added by
    `register_feature`, `validate(tensors, patch, name)`, which raises PatchError for tensors it cannot use. Its
    tensors land in `ErasurePatch.extra[feature]`, after memory and deltas are parsed, so `validate` can compare
    them with the rest of the patch (e.g. `patch.context_dim`). A feature may own no keys at all (a change of
    meaning that old readers must refuse rather than misapply)."""

    keys: re.Pattern[str] | None
    validate: Callable[[dict[str, torch.Tensor], "ErasurePatch", str], None] | None = None
    builtin: bool = False  # parsed into ErasurePatch.memory / .deltas by this module
    # a feature whose file refers to another file (SAeUron's shared SAE): `resolve(patch, folder, name)` puts
    # what it needs into ErasurePatch.resolved after loading, `write_beside(patch, folder)` stores it on saving
    resolve: Callable[["ErasurePatch", Path, str], None] | None = None
    write_beside: Callable[["ErasurePatch", Path], None] | None = None


# The features this reader knows, in the order they are written in erasure.requires. Format 1 had exactly
# memory and deltas; a later method adds its own with register_feature, never by editing the reader.
KNOWN_FEATURES: dict[str, Feature] = {
    "memory": Feature(re.compile(rf"{re.escape(_SHARED_K)}|{re.escape(_SHARED_V)}|{_LAYER_MEMORY.pattern[1:-1]}"),
                      builtin=True),
    "deltas": Feature(re.compile(_DELTA.pattern[1:-1]), builtin=True),
}
FORMAT_1_FEATURES = ("memory", "deltas")  # what a version-1 file (no erasure.requires) may hold
_FEATURE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")


def register_feature(name: str, keys: str | re.Pattern[str] | None = None,
                     validate: Callable[[dict[str, torch.Tensor], "ErasurePatch", str], None] | None = None,
                     resolve: Callable[["ErasurePatch", Path, str], None] | None = None,
                     write_beside: Callable[["ErasurePatch", Path], None] | None = None) -> Feature:
    """Teach this reader (and writer) a new kind of tensor. `keys` is a regular expression every tensor key of
    the feature matches in full; pick a prefix of its own (`erasure.<name>.`), since a key goes to the first
    feature, in KNOWN_FEATURES order, that matches it. Its tensors obey the format's rules for every tensor
    (float16 / bfloat16 / float32, finite); `validate` checks the rest."""
    if not (isinstance(name, str) and _FEATURE_NAME.fullmatch(name)):
        raise ValueError(f"feature name {name!r}: lower-case letters, digits, '_' or '-', at most 40, "
                         "starting with a letter")
    if name in KNOWN_FEATURES:
        raise ValueError(f"feature {name!r} is already known")
    feature = Feature(re.compile(keys) if isinstance(keys, str) else keys, validate, resolve=resolve,
                      write_beside=write_beside)
    KNOWN_FEATURES[name] = feature
    return feature


def unregister_feature(name: str) -> None:
    """Forget a feature added by register_feature (the format's own cannot be removed)."""
    if name in KNOWN_FEATURES and KNOWN_FEATURES[name].builtin:
        raise ValueError(f"feature {name!r} is part of the format")
    KNOWN_FEATURES.pop(name, None)


def _feature_of(key: str) -> str | None:
    return next((name for name, f in KNOWN_FEATURES.items() if f.keys is not None and f.keys.fullmatch(key)), None)


def _shown(text: str, limit: int = 40) -> str:
    """A name from a file, safe for a one-line message."""
    return text if _FEATURE_NAME.fullmatch(text) else ascii(text[:limit])


@dataclass
class ConceptMemory:
    """Learned key/value tokens appended to the text context: K = W_k·[c ; k], V = W_v·[c ; v]."""

    k: torch.Tensor  # (m, d)
    v: torch.Tensor  # (m, d)

    @property
    def tokens(self) -> int:
        return self.k.shape[0]


@dataclass
class WeightDelta:
    """A change to one weight (linear (out, in) or conv (out, in, kh, kw)): full, or low rank
    up @ down * alpha / rank, with conv factors (rank, in, kh, kw) and (out, rank, 1, 1) as kohya stores them."""

    full: torch.Tensor | None = None
    down: torch.Tensor | None = None  # (rank, in)
    up: torch.Tensor | None = None    # (out, rank)
    alpha: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.full.shape) if self.full is not None else (self.up.shape[0], *self.down.shape[1:])

    def weight(self) -> torch.Tensor:
        if self.full is not None:
            return self.full
        rank = self.down.shape[0]
        scale = (self.alpha if self.alpha is not None else rank) / rank
        return ((self.up.float().flatten(1) @ self.down.float().flatten(1)) * scale).view(self.shape)


@dataclass
class ErasurePatch:
    """A loaded or freshly trained patch. `layers` are canonical attn2 names (erasure_core.layers);
    `deltas` are keyed by canonical module paths (LDM), such as `<layer>.to_k`."""

    layers: list[str]
    memory: ConceptMemory | dict[str, ConceptMemory] | None = None
    deltas: dict[str, WeightDelta] = field(default_factory=dict)
    method: str = "memory"
    concepts: list[str] = field(default_factory=list)
    alternative: str = ""
    preserve: list[str] = field(default_factory=list)
    base_model: str = ""
    base_fingerprint: str = ""
    training: dict = field(default_factory=dict)
    seed: int | None = None
    metrics: dict = field(default_factory=dict)
    title: str = ""
    description: str = ""
    date: str = ""
    # tensors of registered features (register_feature), by feature; a feature listed here is required even
    # when it holds no tensors
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # each registered feature's settings (metadata erasure.features, JSON), checked by its validator
    feature_meta: dict[str, dict] = field(default_factory=dict)
    # what a feature resolved from beside the file (Feature.resolve), such as a shared SAE; never saved
    resolved: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    def required_features(self) -> list[str]:
        """What a reader must know to use this patch, from its content: `memory` when it carries concept memory,
        `deltas` when it carries weight deltas, and every feature in `extra`, in KNOWN_FEATURES order (an
        unregistered one last; save_patch refuses it)."""
        present = {"memory": self.memory is not None, "deltas": bool(self.deltas), **dict.fromkeys(self.extra, True)}
        order = [*KNOWN_FEATURES, *(n for n in self.extra if n not in KNOWN_FEATURES)]
        return [name for name in order if present.get(name)]

    def strength_note(self, strength: float | None = None) -> str:
        """What a host shows beside this patch's strength slider: from which strength the patch was measured to
        erase (`metrics["strength"]`, written by `erasure evaluate --strengths --write`), and a warning when
        `strength` is below it. A patch that was never measured says so: the erasure is only known at 1."""
        card = self.metrics.get("strength")
        if not card:
            return "erasing strength not measured: the erasure is known only at strength 1 and may not hold below"
        ua, start = card["ua"], card["erases_from"]
        at = lambda s: f"UA {ua[str(s)]:.2f} at {s:g}"  # noqa: E731
        shown = ", ".join(at(s) for s in (1.0, 0.5) if str(s) in ua)
        if start is None:
            best = max(ua, key=lambda k: ua[k])
            return f"⚠ measured not to erase at any strength (best UA {ua[best]:.2f} at {float(best):g})"
        if strength is not None and strength + 1e-9 < start:
            near = min(ua, key=lambda k: abs(float(k) - strength))
            return (f"⚠ at strength {strength:g} this patch erases much less than at 1: it erases from {start:g} "
                    f"up (measured {at(float(near))}" + (f", {at(1.0)})" if "1.0" in ua else ")"))
        return f"erases from strength {start:g} up (measured {shown})"

    def memory_for(self, layer: str) -> ConceptMemory | None:
        if self.memory is None or layer not in self.layers:
            return None
        return self.memory if isinstance(self.memory, ConceptMemory) else self.memory.get(layer)

    @property
    def context_dim(self) -> int | None:
        mem = self.memory if isinstance(self.memory, ConceptMemory) else next(iter((self.memory or {}).values()), None)
        if mem is not None:
            return mem.k.shape[1]
        for name, delta in self.deltas.items():
            if name.endswith((".attn2.to_k", ".attn2.to_v")):
                return delta.shape[1]
        return None

    @property
    def tokens(self) -> int:
        mem = self.memory if isinstance(self.memory, ConceptMemory) else next(iter((self.memory or {}).values()), None)
        return mem.tokens if mem is not None else 0

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if isinstance(self.memory, ConceptMemory):
            out[_SHARED_K], out[_SHARED_V] = self.memory.k, self.memory.v
        elif self.memory:
            for layer, mem in self.memory.items():
                out[f"erasure.memory.{layer}.k"], out[f"erasure.memory.{layer}.v"] = mem.k, mem.v
        for module, delta in self.deltas.items():
            prefix = kohya_prefix(module)
            if delta.full is not None:
                out[f"{prefix}.diff"] = delta.full
            else:
                out[f"{prefix}.lora_down.weight"], out[f"{prefix}.lora_up.weight"] = delta.down, delta.up
                out[f"{prefix}.alpha"] = torch.tensor(float(delta.alpha if delta.alpha is not None
                                                            else delta.down.shape[0]), dtype=delta.down.dtype)
        for tensors in self.extra.values():
            out.update(tensors)
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        dim = self.context_dim  # None for a patch holding only to_q / to_out deltas
        arch = ARCHITECTURES.get(dim, f"custom-{dim}d") if dim else "unknown"
        concepts = ", ".join(self.concepts) or "a concept"
        return {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{arch}/concept-erasure",
            "modelspec.title": self.title or f"erase {concepts}",
            "modelspec.date": self.date or _dt.date.today().isoformat(),
            "modelspec.description": self.description or f"Erases {concepts} ({self.method}).",
            "erasure.format_version": FORMAT_VERSION,
            "erasure.requires": ",".join(self.required_features()),
            "erasure.method": self.method,
            "erasure.concepts": json.dumps(self.concepts),
            "erasure.alternative": self.alternative,
            "erasure.preserve": json.dumps(self.preserve),
            "erasure.layers": json.dumps(self.layers),
            "erasure.tokens": str(self.tokens),
            "erasure.context_dim": "" if dim is None else str(dim),
            "erasure.base_model": self.base_model,
            "erasure.base_fingerprint": self.base_fingerprint,
            "erasure.training": json.dumps(self.training, sort_keys=True),
            "erasure.seed": "" if self.seed is None else str(self.seed),
            "erasure.metrics": json.dumps(self.metrics, sort_keys=True),
            **({"erasure.features": json.dumps(self.feature_meta, sort_keys=True)} if self.feature_meta else {}),
        }


def content_digest(patch: ErasurePatch) -> str:
    """A short SHA-256 of the patch's tensors, by key: what a run trained on top of it depends on."""
    digest = hashlib.sha256()
    for key, tensor in sorted(patch.tensors().items()):
        digest.update(key.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def why_not_combinable(patches: list[ErasurePatch]) -> str | None:
    """Why `patches` cannot become one file (combine_patches), or None: asked before a run trains on top of them."""
    if any(p.extra for p in patches):
        return ("patches with inference-time features (SAeUron's sae) cannot be combined into one file; apply them "
                "side by side")
    return None


def combine_patches(patches: list[ErasurePatch]) -> ErasurePatch:
    """One patch that acts as `patches` attached together at one strength: weight deltas add, concept memories
    are concatenated in order (as the hosts append them). The metadata is the last patch's, listing every patch's
    concepts, and `training["on_top_of"]` says what the earlier ones were; strength cards are dropped, since they
    were measured on the parts. Raises PatchError where one file cannot say what the stack does."""
    if not patches:
        raise PatchError("nothing to combine")
    reason = why_not_combinable(patches)
    if reason:
        raise PatchError(reason)
    fingerprints = {p.base_fingerprint for p in patches if p.base_fingerprint}
    if len(fingerprints) > 1:
        raise PatchError("the patches were trained on different base models")
    with_memory = [p for p in patches if p.memory is not None]
    layers = list(with_memory[0].layers) if with_memory else []
    if any(set(p.layers) != set(layers) for p in with_memory):
        raise PatchError("the patches carry concept memory in different layers, which one file cannot hold "
                         "(every layer's memory has one size); apply them side by side")
    memory: ConceptMemory | dict[str, ConceptMemory] | None = None
    if len(with_memory) == 1:
        memory = with_memory[0].memory
    elif with_memory and all(isinstance(p.memory, ConceptMemory) for p in with_memory):
        memory = ConceptMemory(torch.cat([p.memory.k for p in with_memory]),
                               torch.cat([p.memory.v for p in with_memory]))
    elif with_memory:
        memory = {layer: ConceptMemory(torch.cat([p.memory_for(layer).k for p in with_memory]),
                                       torch.cat([p.memory_for(layer).v for p in with_memory])) for layer in layers}
    deltas: dict[str, WeightDelta] = {}
    for patch in patches:
        for module, delta in patch.deltas.items():
            weight = delta.weight().float()
            deltas[module] = WeightDelta(full=weight if module not in deltas else deltas[module].full + weight)
    last = patches[-1]
    concepts = list(dict.fromkeys(c for p in patches for c in p.concepts))
    earlier = [{"method": p.method, "concepts": p.concepts, **({"on_top_of": p.training["on_top_of"]}
                                                              if "on_top_of" in p.training else {})}
               for p in patches[:-1]]
    return replace(last, layers=layers, memory=memory, deltas=deltas, concepts=concepts,
                   base_fingerprint=next(iter(fingerprints), ""), metrics={},
                   training={**last.training, "on_top_of": earlier},
                   title="")


def save_patch(patch: ErasurePatch, path: str | Path) -> Path:
    """Write a patch; it is validated first, so a file on disk always loads. A feature that refers to another
    file (Feature.write_beside) writes that one into the same folder first, where loading looks for it."""
    _validate(patch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for feature in patch.extra:
        if KNOWN_FEATURES[feature].write_beside is not None:
            KNOWN_FEATURES[feature].write_beside(patch, path.parent)
    tmp = path.with_name(path.name + ".tmp")
    save_file(patch.tensors(), str(tmp), metadata=patch.metadata())
    tmp.chmod(0o666 & ~_umask())  # safetensors writes 0600; a WebUI running as another user must read it
    tmp.replace(path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _looks_pickled(head: bytes) -> bool:
    """A pickle (protocol 2+) or a PyTorch zip checkpoint."""
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"


def _read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Parse and bound the safetensors header ourselves before any library touches the file."""
    pickled = (f"{path.name} is a pickle / PyTorch checkpoint; only safetensors patches are accepted "
               "(pickles can run code)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            if len(head) < 9 or head[8:9] != b"{":  # a safetensors header is a JSON object
                raise PatchError(pickled if _looks_pickled(head) else f"{path.name} is not a safetensors file")
            (n,) = struct.unpack("<Q", head[:8])
            if n > MAX_HEADER_BYTES:
                raise PatchError(pickled if _looks_pickled(head) else f"{path.name}: the header claims {n} bytes "
                                 f"(limit {MAX_HEADER_BYTES}); not a valid patch")
            if 8 + n > size:
                raise PatchError(f"{path.name} is truncated (header runs past the end of the file)")
            f.seek(8)
            raw = f.read(n)
    except OSError as exc:
        raise PatchError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise PatchError(f"{path.name} is not a safetensors file (unreadable header)") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PatchError(f"{path.name}: metadata must map strings to strings")
    data_len = size - 8 - n
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and "dtype" in info):
            raise PatchError(f"{path.name}: malformed entry {key!r}")
        if info["dtype"] not in ALLOWED_DTYPES:
            raise PatchError(f"{path.name}: tensor {key!r} has dtype {info['dtype']}; patches use "
                             f"{', '.join(ALLOWED_DTYPES)}")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise PatchError(f"{path.name} is truncated (tensor {key!r} runs past the end of the file)")
    return header, metadata


def load_patch(path: str | Path) -> ErasurePatch:
    """Load and validate a patch file; raises PatchError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise PatchError(f"no patch file at {path}")
    header, meta = _read_header(path)
    required = _required_features(meta, path.name)
    for key in header:  # every tensor belongs to a feature the file declares, before any tensor is read
        if _feature_of(key) not in required:
            raise PatchError(f"{path.name}: unknown key {ascii(key[:200])} (not a tensor of the features it declares: "
                             f"{', '.join(required) or 'none'})")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in header}
    except Exception as exc:  # safetensors raises its own error types
        raise PatchError(f"{path.name} is not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    patch = _from_parts(tensors, meta, path.name)
    patch.extra = {f: {k: t for k, t in tensors.items() if _feature_of(k) == f}
                   for f in required if not KNOWN_FEATURES[f].builtin}
    _validate(patch, path.name)
    _check_metadata_matches(patch, meta, path.name)
    for feature in patch.extra:
        if KNOWN_FEATURES[feature].resolve is not None:
            KNOWN_FEATURES[feature].resolve(patch, path.parent, path.name)
    return patch


def _required_features(meta: dict[str, str], name: str) -> list[str]:
    """The features a file needs, refusing it when this reader does not know them all.

    Version 1 had no erasure.requires and means memory and deltas; version 2 and any later version must declare
    erasure.requires, which is what a reader goes by: a later version whose features are all known loads."""
    version = meta.get("erasure.format_version", "")
    if not version and meta.get("erasure.kind") == "sae":
        raise PatchError(f"{name} is SAeUron's sparse autoencoder, not a patch; keep it beside the SAeUron patches "
                         "that use it and load one of those")
    if not version:
        raise PatchError(f"{name} is not an erasure patch (no erasure.format_version metadata)")
    declared = meta.get("erasure.requires")
    if declared is None:
        if version == "1":
            return list(FORMAT_1_FEATURES)
        if re.fullmatch(r"[1-9][0-9]{0,8}", version):
            raise PatchError(f"{name} has patch format {version} without erasure.requires; this version reads "
                             "format 1 and later formats that declare erasure.requires (update concept-erasure)")
    if not re.fullmatch(r"[1-9][0-9]{0,8}", version):
        raise PatchError(f"{name}: erasure.format_version {_shown(version)} is not a format number")
    required = list(dict.fromkeys(part.strip() for part in declared.split(",") if part.strip()))
    unknown = [_shown(f) for f in required if f not in KNOWN_FEATURES]
    if unknown:
        listed = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise PatchError(f"{name} needs features the installed concept-erasure does not know: {listed}; "
                         "update concept-erasure to load it")
    return required


def _json(meta: dict[str, str], key: str, kind: type, default, name: str):
    text = meta.get(key, "")
    if not text:
        return default
    try:
        value = json.loads(text)
    except ValueError:
        raise PatchError(f"{name}: metadata {key} is not valid JSON") from None
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        expected = "list of strings" if kind is list else kind.__name__
        raise PatchError(f"{name}: metadata {key} should be a JSON {expected}")
    return value


def _int(meta: dict[str, str], key: str, name: str) -> int | None:
    text = meta.get(key, "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise PatchError(f"{name}: metadata {key} should be an integer, got {text[:40]!r}") from None


def _check_metadata_matches(patch: ErasurePatch, meta: dict[str, str], name: str) -> None:
    """The header's token count and context dim describe the tensors; a mismatch means a hand-edited file."""
    for key, actual in (("erasure.tokens", patch.tokens), ("erasure.context_dim", patch.context_dim)):
        stated = _int(meta, key, name)
        if stated is not None and actual is not None and stated != actual:
            raise PatchError(f"{name}: metadata {key} says {stated}, the tensors have {actual}")


def _from_parts(tensors: dict[str, torch.Tensor], meta: dict[str, str], name: str) -> ErasurePatch:
    shared: dict[str, torch.Tensor] = {}
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    delta_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if (feature := _feature_of(key)) is not None and not KNOWN_FEATURES[feature].builtin:
            continue  # a registered feature's tensors: load_patch puts them in ErasurePatch.extra
        if key in (_SHARED_K, _SHARED_V):
            shared[key[-1]] = value
        elif m := _LAYER_MEMORY.match(key):
            per_layer.setdefault(m.group(1), {})[m.group(2)] = value
        elif m := _DELTA.match(key):
            try:
                module = from_kohya_module(m.group(1))
            except ValueError:
                raise PatchError(f"{name}: unknown key {key!r}") from None
            delta_parts.setdefault(module, {})[m.group(2)] = value
        else:
            raise PatchError(f"{name}: unknown key {key!r}")
    if shared and per_layer:
        raise PatchError(f"{name}: has both shared and per-layer memory")

    def memory(parts: dict[str, torch.Tensor], where: str) -> ConceptMemory:
        if set(parts) != {"k", "v"}:
            raise PatchError(f"{name}: memory {where} needs both k and v")
        return ConceptMemory(parts["k"], parts["v"])

    mem = memory(shared, "(shared)") if shared else ({k: memory(v, k) for k, v in per_layer.items()} or None)
    deltas = {}
    for module, parts in delta_parts.items():
        if "diff" in parts:
            if len(parts) != 1:
                raise PatchError(f"{name}: {module} has both a full and a low-rank delta")
            deltas[module] = WeightDelta(full=parts["diff"])
        else:
            if not {"lora_down.weight", "lora_up.weight"} <= set(parts):
                raise PatchError(f"{name}: {module} needs both lora_down and lora_up")
            alpha = parts.get("alpha")
            if alpha is not None and alpha.numel() != 1:
                raise PatchError(f"{name}: {module} alpha must be a scalar")
            deltas[module] = WeightDelta(down=parts["lora_down.weight"], up=parts["lora_up.weight"],
                                         alpha=None if alpha is None else float(alpha.float()))
    return ErasurePatch(
        layers=_json(meta, "erasure.layers", list, [], name), memory=mem, deltas=deltas,
        method=meta.get("erasure.method", ""), concepts=_json(meta, "erasure.concepts", list, [], name),
        alternative=meta.get("erasure.alternative", ""), preserve=_json(meta, "erasure.preserve", list, [], name),
        base_model=meta.get("erasure.base_model", ""), base_fingerprint=meta.get("erasure.base_fingerprint", ""),
        training=_json(meta, "erasure.training", dict, {}, name), seed=_int(meta, "erasure.seed", name),
        metrics=_json(meta, "erasure.metrics", dict, {}, name),
        feature_meta=_json(meta, "erasure.features", dict, {}, name), title=meta.get("modelspec.title", ""),
        description=meta.get("modelspec.description", ""), date=meta.get("modelspec.date", ""))


def _check_strength_card(card, name: str) -> None:
    """metrics["strength"]: {"ua": {"<strength>": rate in [0, 1]}, "erases_from": a strength or null, ...}."""
    if not isinstance(card, dict) or not isinstance(card.get("ua"), dict) or "erases_from" not in card:
        raise PatchError(f"{name}: erasure.metrics strength must hold ua and erases_from")
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    for key, value in card["ua"].items():
        try:
            strength = float(key)
        except ValueError:
            strength = float("nan")
        if not (math.isfinite(strength) and number(value) and 0 <= value <= 1 and key == str(strength)):
            raise PatchError(f"{name}: erasure.metrics strength ua has a bad entry {_shown(str(key))}")
    start = card["erases_from"]
    if start is not None and not (number(start) and 0 <= start <= 4):
        raise PatchError(f"{name}: erasure.metrics strength erases_from must be a strength in [0, 4] or null")


def _validate(patch: ErasurePatch, name: str = "patch") -> None:
    """Shapes consistent, values finite, layers named: the invariants every host relies on."""
    if "strength" in patch.metrics:
        _check_strength_card(patch.metrics["strength"], name)
    bad = [layer for layer in patch.layers if not (isinstance(layer, str) and is_canonical_layer(layer))]
    if bad:
        raise PatchError(f"{name}: {bad[0]!r} is not a cross-attention layer name (LDM path such as "
                         "middle_block.1.transformer_blocks.0.attn2)")
    if patch.memory is None and not patch.deltas and not patch.extra:
        raise PatchError(f"{name}: holds neither memory nor weight deltas")
    mems = [patch.memory] if isinstance(patch.memory, ConceptMemory) else list((patch.memory or {}).values())
    if isinstance(patch.memory, dict) and set(patch.memory) != set(patch.layers):
        raise PatchError(f"{name}: per-layer memory does not match erasure.layers")
    if mems and not patch.layers:
        raise PatchError(f"{name}: memory without layers to inject it into")
    for mem in mems:
        if mem.k.dim() != 2 or mem.k.shape != mem.v.shape or mem.k.shape[0] < 1:
            raise PatchError(f"{name}: memory k and v must both be (tokens x dim); got {tuple(mem.k.shape)} "
                             f"and {tuple(mem.v.shape)}")
    if len({m.k.shape for m in mems}) > 1:
        raise PatchError(f"{name}: per-layer memories differ in shape")
    for module, d in patch.deltas.items():
        if not (isinstance(module, str) and is_canonical_module(module)):
            raise PatchError(f"{name}: {module!r} is not a UNet weight (LDM path such as "
                             "input_blocks.1.1.transformer_blocks.0.attn2.to_k)")
        if d.full is not None:
            if d.full.dim() not in (2, 4):
                raise PatchError(f"{name}: delta {module} must be a linear or conv weight")
        elif d.down is None or d.up is None or d.down.dim() != d.up.dim() or d.down.dim() not in (2, 4) \
                or d.up.shape[1] != d.down.shape[0] or d.up.shape[2:] not in ((), (1, 1)):
            raise PatchError(f"{name}: low-rank delta {module} has inconsistent lora_up / lora_down shapes")
    dim = patch.context_dim
    for module, d in patch.deltas.items():
        if module.endswith((".attn2.to_k", ".attn2.to_v")) and d.shape[1] != dim:
            raise PatchError(f"{name}: delta {module} takes {d.shape[1]}-d context, the rest of the patch {dim}-d")
    tensors = [t for m in mems for t in (m.k, m.v)]
    tensors += [x for d in patch.deltas.values() for x in (d.full, d.down, d.up) if x is not None]
    for feature, parts in patch.extra.items():
        if feature not in KNOWN_FEATURES or KNOWN_FEATURES[feature].builtin:
            raise PatchError(f"{name}: {_shown(str(feature))} is not a registered feature (register_feature)")
        pattern = KNOWN_FEATURES[feature].keys
        for key, t in parts.items():
            if not (isinstance(key, str) and _feature_of(key) == feature):
                raise PatchError(f"{name}: {ascii(str(key)[:200])} is not a tensor key of feature {feature}"
                                 + ("" if pattern is None else f" ({pattern.pattern})"))
            if not isinstance(t, torch.Tensor):
                raise PatchError(f"{name}: {key} is not a tensor")
        tensors += list(parts.values())
    for t in tensors:
        if t.dtype not in ALLOWED_DTYPES.values():
            raise PatchError(f"{name}: unsupported dtype {t.dtype}; patches use float16, bfloat16 or float32")
        if not torch.isfinite(t.detach()).all():
            raise PatchError(f"{name}: contains NaN or Inf values")
    if any(d.alpha is not None and not torch.isfinite(torch.tensor(d.alpha)) for d in patch.deltas.values()):
        raise PatchError(f"{name}: contains NaN or Inf values")
    for feature, parts in patch.extra.items():
        check = KNOWN_FEATURES[feature].validate
        try:
            if check is not None:
                check(parts, patch, name)
        except PatchError:
            raise
        except Exception as exc:  # a validator that trips over a hostile file still gives a one-line reason
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise PatchError(f"{name}: {feature} tensors are invalid ({reason})") from None


def check_compatible(patch: ErasurePatch, context_dim: int, layer_names: list[str],
                     fingerprint: str | None = None, weight_shapes: dict[str, tuple[int, ...]] | None = None
                     ) -> list[str]:
    """Refuse a patch the model cannot take (PatchError); return warnings for what is merely unusual.
    `weight_shapes` names every weight the model has (canonical module paths); without it, only cross-attention
    deltas can be checked and any other delta is refused."""
    dim = patch.context_dim
    if dim is not None and dim != context_dim:
        need = ARCHITECTURES.get(dim, f"a {dim}-d model")
        raise PatchError(f"patch needs a {dim}-d text context ({need}); this model has {context_dim}")
    missing = [layer for layer in patch.layers if layer not in layer_names]
    if weight_shapes is None:
        missing += [m for m in patch.deltas if not is_attn2_projection(m) or layer_of(m) not in layer_names]
    else:
        missing += [m for m in patch.deltas if m not in weight_shapes]
    if missing:
        raise PatchError(f"patch names layers this model lacks ({missing[0]}, {len(missing)} in all); "
                         "it was made for another architecture")
    for module, delta in patch.deltas.items():
        if weight_shapes is not None and tuple(weight_shapes[module]) != delta.shape:
            raise PatchError(f"delta {module} is {delta.shape}, the model's weight is {tuple(weight_shapes[module])}")
    warnings = []
    if fingerprint and patch.base_fingerprint and fingerprint != patch.base_fingerprint:
        warnings.append(f"patch was trained on {patch.base_model or 'another checkpoint'} "
                        f"({patch.base_fingerprint}); this model's fingerprint is {fingerprint}. It usually "
                        "transfers to fine-tunes of the same base; check the result")
    return warnings


def fingerprint_of(weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (canonical weight name, float32 little-endian bytes) pairs in the given order, 16 hex.

    Every host computes it the same way from the attn2 to_k / to_v weights in LDM order, so a patch's
    base fingerprint means the same thing in diffusers, ComfyUI, A1111 and Forge."""
    h = hashlib.sha256()
    for name, weight in weights:
        h.update(name.encode())
        h.update(weight.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(unet) -> str:
    """A short, stable hash of a diffusers UNet's cross-attention K/V weights: identifies the base checkpoint.
    Through an adapter wrapper (a LoRA loaded with peft) it hashes the base weight, so a LoRA leaves it alone."""
    modules = dict(unet.named_modules())
    return fingerprint_of((f"{layer.canonical}.{proj}.weight",
                           base_layer(modules[f"{layer.diffusers}.{proj}"]).weight)
                          for layer in attn2_layers(unet) for proj in ("to_k", "to_v"))


from . import sae as _sae  # noqa: E402,F401  (registers SAeUron's `sae` feature; it needs the names above)
from . import branch as _branch  # noqa: E402,F401  (registers DuMo's `branch` feature)
