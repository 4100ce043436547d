"""Train Erasure Patch: trains a patch on the MODEL and CLIP already loaded, with ComfyUI's progress bar and
interrupt button. The MODEL is never modified (erasure_core.backends.comfy.ComfyDenoiser)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from erasure_core.backends.comfy import ComfyDenoiser
from erasure_core.engine import Cancelled, TrainConfig
from erasure_core.layers import SELECTION_MODES
from erasure_core.methods import METHODS, train_patch

from .common import (CATEGORY, PATCH_TYPE, folder_paths_module, interrupt_check, loader, model_management,
                     progress_bar)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
DEFAULT_METHOD = "memory" if "memory" in METHODS else METHODS[0]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def make_config(concept: str, method: str, alternative: str, preserve: str, steps: int, learning_rate: float,
                layers: str, seed: int, memory_learning_rate: float | None = None, memory_tokens: int | None = None,
                batch_size: int | None = None, cache_seeds: int | None = None,
                cache_steps: int | None = None) -> TrainConfig:
    if not concept.strip():
        raise ValueError("say which concept to erase (the 'concept' text, as you would prompt it)")
    values = dict(concept=concept.strip(), method=method, alternative=alternative.strip(), preserve=_lines(preserve),
                  steps=int(steps), lr=float(learning_rate) or None, layers=layers, seed=int(seed))
    optional = dict(memory_lr=memory_learning_rate, tokens=memory_tokens, batch=batch_size, cache_seeds=cache_seeds,
                    cache_steps=cache_steps)
    values.update({k: v for k, v in optional.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def _checkpoint_path(config: TrainConfig, fingerprint: str, extra: str) -> Path:
    """Where an interrupted run leaves its state, so that the same run queued again resumes from it."""
    key = json.dumps([dataclasses.asdict(config), fingerprint, extra], sort_keys=True, default=str)
    folder = Path(folder_paths_module().get_temp_directory()) / "concept_erasure"
    return folder / f"train_{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


class ConceptErasureTrainPatch:
    DESCRIPTION = ("Trains an erasure patch on the MODEL and CLIP you have loaded, on this GPU. The MODEL itself is "
                   "never changed: connect the result to Apply Erasure Patch, or save it. Interrupting keeps a "
                   "checkpoint, and queueing the same settings again resumes from it. To train again with "
                   "unchanged settings, change 'rerun'.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = (PATCH_TYPE, PATCH_TYPE)
    RETURN_NAMES = ("erasure_patch", "key")
    OUTPUT_TOOLTIPS = ("The trained patch.",
                       "memory-key only: the memory that restores the concept (None for the other methods).")

    @classmethod
    def INPUT_TYPES(cls):
        layers_default = _DEFAULTS.get("layers", "all")
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to erase the concept from (SD1.x, SD2.x, SDXL)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder that goes with the model."}),
                "concept": ("STRING", {"default": "", "tooltip": "What to erase, as you would prompt it: "
                                                                 "'Van Gogh', 'a cat'."}),
                "method": (list(METHODS), {"default": DEFAULT_METHOD,
                                           "tooltip": "memory: concept memory + attention deltas (Bui et al.); "
                                                      "memory-only: a few-KB plug-in; memory-key: erase, with a "
                                                      "key that restores; all-but-one: replace by the "
                                                      "alternative, keep layout; esd-x / esd-x-strict / esd-u "
                                                      "(every layer outside cross-attention: large) / uce: "
                                                      "baselines."}),
                "alternative": ("STRING", {"default": "", "tooltip": "What to draw instead (all-but-one, uce). "
                                                                     "Empty: nothing in particular."}),
                "preserve": ("STRING", {"default": "", "multiline": True,
                                        "tooltip": "Concepts to keep intact, one per line."}),
                "steps": ("INT", {"default": _DEFAULTS.get("steps", 200), "min": 1, "max": 100000,
                                  "tooltip": "Training steps (uce is closed-form and ignores it)."}),
                "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6,
                                            "tooltip": "Learning rate of the weight deltas. 0: the method's "
                                                       "default (1e-3; esd-u 1e-4)."}),
                "layers": (list(SELECTION_MODES), {"default": layers_default if isinstance(layers_default, str)
                                                   else "all",
                                                   "tooltip": "Cross-attention layers to train: mid (middle block), "
                                                              "midout (middle + decoder) or all."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                 "tooltip": "Seed of the sampled training trajectories and of the initial memory."}),
            },
            "optional": {
                "memory_learning_rate": ("FLOAT", {"default": _DEFAULTS.get("memory_lr", 1e-2), "min": 1e-7,
                                                   "max": 1.0, "step": 1e-6,
                                                   "tooltip": "Learning rate of the memory tokens."}),
                "memory_tokens": ("INT", {"default": _DEFAULTS.get("tokens", 8), "min": 1, "max": 77,
                                          "tooltip": "How many memory tokens (memory methods)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Samples per step. Lower it first when memory runs out."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                       "tooltip": "Training image size in pixels (512 for SD1.x, 768 for SD2-768, "
                                                  "1024 for SDXL). Lower it when memory runs out."}),
                "cache_seeds": ("INT", {"default": _DEFAULTS.get("cache_seeds", 8), "min": 1, "max": 256,
                                        "tooltip": "Trajectories sampled once from the frozen model to train on."}),
                "cache_steps": ("INT", {"default": _DEFAULTS.get("cache_steps", 25), "min": 2, "max": 200,
                                        "tooltip": "DDIM steps of each cached trajectory."}),
                "rerun": ("INT", {"default": 0, "min": 0, "max": 0xFFFF,
                                  "tooltip": "Change to train again with the same settings."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, rerun=0, **kwargs):
        """ComfyUI reuses a result while the inputs stay the same; `rerun` asks for a new run explicitly."""
        return str(rerun)

    def train(self, model, clip, concept, method, alternative, preserve, steps, learning_rate, layers, seed,
              memory_learning_rate=None, memory_tokens=None, batch_size=1, resolution=512, cache_seeds=None,
              cache_steps=None, rerun=0):
        config = make_config(concept, method, alternative, preserve, steps, learning_rate, layers, seed,
                             memory_learning_rate, memory_tokens, batch_size, cache_seeds, cache_steps)
        mm = model_management()
        bar = progress_bar(config.steps)
        interrupted: list[BaseException] = []

        def progress(step, total, loss):
            bar.update_absolute(step, total)

        def cancel() -> bool:
            try:
                mm.throw_exception_if_processing_interrupted()
            except mm.InterruptProcessingException as exc:  # let the engine save its checkpoint first
                interrupted.append(exc)
                return True
            return False

        denoiser = ComfyDenoiser(model, clip, width=resolution, height=resolution, load_model=loader(training=True),
                                 check_interrupt=interrupt_check())
        oom = getattr(mm, "OOM_EXCEPTION", torch.cuda.OutOfMemoryError)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                checkpoint = _checkpoint_path(config, denoiser.fingerprint(), f"{resolution}")
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                result = train_patch(denoiser, config, progress=progress, cancel=cancel, checkpoint=checkpoint)
        except Cancelled:
            raise (interrupted[0] if interrupted else mm.InterruptProcessingException()) from None
        except oom:
            denoiser.release()
            getattr(mm, "soft_empty_cache", lambda *a, **k: None)(True)
            raise RuntimeError(f"out of memory while training; lower batch_size (now {config.batch}), resolution "
                               f"(now {resolution}) or the layers trained (now {config.layers!r}). Nothing was "
                               "applied to the model.") from None
        finally:
            denoiser.release()
        if checkpoint.exists():
            os.remove(checkpoint)
        result.patch.training.setdefault("resolution", resolution)
        return (result.patch, result.key)
