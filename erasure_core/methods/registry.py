"""The method registry: every erasure method registers one `MethodSpec`, and every front end (the CLI's choices
and help, the ComfyUI node's dropdown and tooltip, the WebUI tab's dropdown, the benchmark) reads it from here.

A new method is one file under erasure_core/methods/ that calls `register(MethodSpec(...))`, imported once in
erasure_core/methods/__init__.py (or by a third-party package before the front end builds its inputs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from ..denoiser import Denoiser
    from ..engine import TrainConfig
    from ..patch import ErasurePatch

KINDS = ("trained", "closed-form", "inference-time")


@dataclass
class TrainResult:
    """What every method returns: the patch to apply, the loss per step (empty for closed-form methods), the
    wall time (set by train_patch), and for methods that make one, a key: a second patch that undoes the first."""

    patch: "ErasurePatch"
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    key: "ErasurePatch | None" = None


class TrainFunction(Protocol):
    def __call__(self, denoiser: "Denoiser", config: "TrainConfig", *, cache=None, checkpoint: Path | None = None,
                 progress: Callable[..., None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> TrainResult: ...


@dataclass(frozen=True)
class MethodSpec:
    name: str                  # what users type: --method NAME
    summary: str               # one line, shown in help texts and tooltips
    source: str                # the paper it comes from
    reconstruction: bool       # True where our training is a reconstruction (no public training code followed)
    kind: str                  # one of KINDS
    trains: str                # what it changes, in words: "memory tokens + attn2 to_k/to_v deltas"
    train: TrainFunction
    takes_alternative: bool = False  # an alternative concept steers the erased one somewhere
    needs_alternative: bool = False  # ... and the method cannot work without one
    takes_preserve: bool = True      # a preservation list is used
    delta_lr: float | None = 1e-3    # default learning rates of its weight deltas and memory tokens (None: has none)
    memory_lr: float | None = None
    makes_key: bool = False          # also returns a key patch

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.needs_alternative and not self.takes_alternative:
            raise ValueError(f"method {self.name!r} needs an alternative but does not take one")


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method. Registering a name twice is an error, so two files cannot silently claim one name."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(_REGISTRY)}") from None


def methods_help(separator: str = "; ") -> str:
    """`name: summary` for every method, for help texts and tooltips."""
    return separator.join(f"{spec.name}: {spec.summary}" for spec in _REGISTRY.values())
