"""Train Erasure Patch: trains a patch on the MODEL and CLIP already loaded, with ComfyUI's progress bar and
interrupt button. The MODEL is never modified (erasure_core.backends.comfy.ComfyDenoiser)."""
from __future__ import annotations

import dataclasses

from pathlib import Path

import torch

from erasure_core.backends.comfy import ComfyDenoiser
from erasure_core.engine import Cancelled, TrainConfig, checkpoint_path, discard_checkpoint
from erasure_core.layers import SELECTION_MODES
from erasure_core.methods import DEFAULT_METHOD, get_method, method_names, methods_help, train_patch
from erasure_core.request import TrainRequest, prepare

from .common import (CATEGORY, FOLDER, HIDDEN_NODE_ID, PATCH_TYPE, folder_paths_module, interrupt_check, loader,
                     model_management, progress_bar, show_text, warn)

_DEFAULTS = TrainRequest(concept="")
_ENGINE_DEFAULTS = TrainConfig(concept="")


def make_request(concept: str, method: str, alternative: str, preserve: str, steps: int, learning_rate: float,
                 layers: str, seed: int, memory_learning_rate: float | None = None, memory_tokens: int | None = None,
                 batch_size: int | None = None, cache_seeds: int | None = None,
                 cache_steps: int | None = None, cache_on_cpu: bool = False, on_top_of=None) -> TrainRequest:
    """The node's inputs as a training request (erasure_core.request); 0 learning rates mean the method's."""
    return TrainRequest(concept=concept, method=method, alternative=alternative, preserve=preserve,
                        steps=int(steps), lr=learning_rate or None, memory_lr=memory_learning_rate or None,
                        tokens=memory_tokens if memory_tokens is not None else _DEFAULTS.tokens, layers=layers,
                        seed=int(seed), batch=batch_size, cache_seeds=cache_seeds, cache_steps=cache_steps,
                        cache_on_cpu=bool(cache_on_cpu), on_top_of=[] if on_top_of is None else [on_top_of])


def _checkpoint_folder() -> Path:
    return Path(folder_paths_module().get_temp_directory()) / "concept_erasure"


def _patch_folder() -> str:
    """models/erasures (the first of its paths): where Save Erasure Patch writes, and SAeUron's SAE is kept."""
    return folder_paths_module().get_folder_paths(FOLDER)[0]


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
        methods = method_names()
        takes = ", ".join(m for m in methods if get_method(m).takes_alternative)
        rates = ", ".join(f"{m} {get_method(m).delta_lr:g}" for m in methods if get_method(m).delta_lr)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to erase the concept from (SD1.x, SD2.x, SDXL)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder that goes with the model."}),
                "concept": ("STRING", {"default": "", "tooltip": "What to erase, as you would prompt it: "
                                                                 "'Van Gogh', 'a cat'. Several, separated by "
                                                                 "commas, are erased by one patch."}),
                "method": (list(methods), {"default": DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0],
                                           "tooltip": methods_help()}),
                "alternative": ("STRING", {"default": "", "tooltip": f"What to draw instead ({takes}). "
                                                                     "Empty: nothing in particular."}),
                "preserve": ("STRING", {"default": _DEFAULTS.preserve, "multiline": True,
                                        "tooltip": "Concepts to keep intact, one per line or separated by commas. "
                                                   "'auto': the model's own default (for a checkpoint: the 8 "
                                                   "nearest concepts of the shipped word list); "
                                                   "'none' or empty: nothing."}),
                "steps": ("INT", {"default": _DEFAULTS.steps, "min": 1, "max": 100000,
                                  "tooltip": "Training steps (uce is closed-form and ignores it)."}),
                "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6,
                                            "tooltip": f"Learning rate of the weight deltas. 0: the method's "
                                                       f"default ({rates})."}),
                "layers": (list(SELECTION_MODES), {"default": _DEFAULTS.layers,
                                                   "tooltip": "Cross-attention layers to train: mid (middle block), "
                                                              "midout (middle + decoder) or all."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Seed of the sampled training trajectories and of the initial memory "
                                            "(fixed: a new seed would train again on every Queue)."}),
            },
            "optional": {
                "memory_learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6,
                                                   "tooltip": "Learning rate of the memory tokens. 0: the "
                                                              "method's default."}),
                "memory_tokens": ("INT", {"default": _DEFAULTS.tokens, "min": 1, "max": 77,
                                          "tooltip": "How many memory tokens (memory methods)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Samples per step. Lower it first when memory runs out."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                       "tooltip": "Training image size in pixels (512 for SD1.x, 768 for SD2-768, "
                                                  "1024 for SDXL). Lower it when memory runs out."}),
                "cache_seeds": ("INT", {"default": _ENGINE_DEFAULTS.cache_seeds, "min": 1, "max": 256,
                                        "tooltip": "Trajectories sampled once from the frozen model to train on."}),
                "cache_steps": ("INT", {"default": _ENGINE_DEFAULTS.cache_steps, "min": 2, "max": 200,
                                        "tooltip": "DDIM steps of each cached trajectory."}),
                "rerun": ("INT", {"default": 0, "min": 0, "max": 0xFFFF,
                                  "tooltip": "Change to train again with the same settings."}),
                # added last: a saved workflow's widget values stay in their places
                "cache_on_cpu": ("BOOLEAN", {"default": False,
                                             "tooltip": "Keep the cached trajectories in RAM instead of GPU "
                                                        "memory (each batch is moved over)."}),
                "on_top_of": (PATCH_TYPE, {"tooltip": "An earlier erasure to train on top of: it stays applied "
                                                      "while training and its concepts stay erased; the patch "
                                                      "out holds both."}),
            },
            **HIDDEN_NODE_ID,
        }

    @classmethod
    def IS_CHANGED(cls, rerun=0, **kwargs):
        """ComfyUI reuses a result while the inputs stay the same; `rerun` asks for a new run explicitly."""
        return str(rerun)

    def train(self, model, clip, concept, method, alternative, preserve, steps, learning_rate, layers, seed,
              memory_learning_rate=None, memory_tokens=None, batch_size=1, resolution=512, cache_seeds=None,
              cache_steps=None, rerun=0, cache_on_cpu=False, on_top_of=None, unique_id=None):
        denoiser = ComfyDenoiser(model, clip, width=resolution, height=resolution, load_model=loader(training=True),
                                 check_interrupt=interrupt_check())
        request = make_request(concept, method, alternative, preserve, steps, learning_rate, layers, seed,
                               memory_learning_rate, memory_tokens, batch_size, cache_seeds, cache_steps,
                               cache_on_cpu, on_top_of)
        plan = prepare(dataclasses.replace(request, sae=_patch_folder()), denoiser)  # SAeUron reuses an SAE there
        notes = [f"⚠ note: {note}" for note in plan.notes]
        warn([f"note: {note}" for note in plan.notes], unique_id)
        config = plan.config
        mm = model_management()
        bar = progress_bar(config.steps)
        interrupted: list[BaseException] = []
        shown_stage: list[str | None] = [None]

        def progress(done, total, loss=None, stage=None):
            if interrupted:
                return
            if stage != shown_stage[0]:  # the bar alone cannot say which phase it is measuring
                shown_stage[0] = stage
                show_text([*notes, f"{stage}…"], unique_id)
            try:  # ComfyUI's progress hook raises the interrupt itself, from inside the update
                bar.update_absolute(done, total)
            except mm.InterruptProcessingException as exc:  # the engine's next cancel check saves a checkpoint
                interrupted.append(exc)

        def cancel() -> bool:
            if interrupted:
                return True
            try:
                mm.throw_exception_if_processing_interrupted()
            except mm.InterruptProcessingException as exc:  # let the engine save its checkpoint first
                interrupted.append(exc)
                return True
            return False

        oom = getattr(mm, "OOM_EXCEPTION", torch.cuda.OutOfMemoryError)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                checkpoint = checkpoint_path(_checkpoint_folder(), config, denoiser.fingerprint(),
                                             f"{resolution}{plan.earlier_digest}")
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                result = plan.label(train_patch(denoiser, config, progress=progress, cancel=cancel,
                                                checkpoint=checkpoint, on_top_of=plan.on_top_of))
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
        discard_checkpoint(checkpoint)
        show_text([*notes, f"trained: {result.patch.method}, {config.steps} steps"], unique_id)
        result.patch.training.setdefault("resolution", resolution)
        return (result.patch, result.key)
