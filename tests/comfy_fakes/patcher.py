"""ModelPatcher, model management and cond batching as ComfyUI does them (model_patcher.py, lora.py,
model_management.py, samplers.py, conds.py)."""
from __future__ import annotations

import copy
import math
import uuid

import torch


def _get_attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr_param(obj, dotted: str, value: torch.Tensor) -> None:
    *path, last = dotted.split(".")
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, torch.nn.Parameter(value, requires_grad=False))


def calculate_weight(patches, weight: torch.Tensor, key: str) -> torch.Tensor:
    """The "diff" branch of ComfyUI's calculate_weight: weight += strength * diff (shape-checked)."""
    for strength, value, strength_model, offset, function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        if len(value) == 2 and isinstance(value[0], str):
            kind, value = value
        else:
            kind = "diff"
        if kind != "diff":
            raise NotImplementedError(f"fake calculate_weight handles diff patches only, got {kind}")
        diff = value[0]
        if strength != 0.0:
            if diff.shape != weight.shape:
                raise AssertionError(f"shape mismatch for {key}: {diff.shape} vs {weight.shape}")
            weight += strength * diff.to(weight.device, weight.dtype)
    return weight


class FakeModelPatcher:
    """comfy.model_patcher.ModelPatcher, with the behaviours the adapter relies on."""

    def __init__(self, model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.patches: dict[str, list] = {}
        self.backup: dict[str, torch.Tensor] = {}
        self.object_patches: dict = {}
        self.model_options: dict = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()

    def clone(self) -> "FakeModelPatcher":
        n = FakeModelPatcher(self.model, self.load_device, self.offload_device)  # the nn.Module is shared
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)  # patch objects and their tensors included
        n.backup = self.backup
        return n

    def is_clone(self, other) -> bool:
        return hasattr(other, "model") and self.model is other.model

    def set_model_patch(self, patch, name: str) -> None:
        to = self.model_options["transformer_options"]
        if "patches" not in to:
            to["patches"] = {}
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_attn2_patch(self, patch) -> None:
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None) -> None:
        to = self.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        block = (block_name, number, transformer_index) if transformer_index is not None else (block_name, number)
        to["patches_replace"]["attn2"][block] = patch
        self.model_options["transformer_options"] = to

    def model_patches_to(self, device) -> None:
        """Called by ComfyUI before sampling with the load device and then with the model dtype."""
        patches = self.model_options["transformer_options"].get("patches", {})
        for name, patch_list in patches.items():
            for i in range(len(patch_list)):
                if hasattr(patch_list[i], "to"):
                    patch_list[i] = patch_list[i].to(device)

    def model_dtype(self):
        return self.model.get_dtype()

    def get_model_object(self, name: str):
        return self.object_patches.get(name) or _get_attr(self.model, name)

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        applied = set()
        model_sd = self.model.state_dict()
        for k in patches:
            offset = function = None
            if isinstance(k, str):
                key = k
            else:
                key, offset = k[0], k[1]
                function = k[2] if len(k) > 2 else None
            if key in model_sd:
                applied.add(k)
                self.patches.setdefault(key, []).append((strength_patch, patches[k], strength_model, offset, function))
        self.patches_uuid = uuid.uuid4()
        return list(applied)

    def model_state_dict(self):
        return self.model.state_dict()

    def patch_model(self) -> None:
        """Bake the weight patches into the shared weights, keeping a backup (what loading does)."""
        for key, patch_list in self.patches.items():
            weight = _get_attr(self.model, key)
            if key not in self.backup:
                self.backup[key] = weight
            out = calculate_weight(patch_list, weight.to(torch.float32, copy=True), key).to(weight.dtype)
            _set_attr_param(self.model, key, out)

    def unpatch_model(self) -> None:
        for key, weight in list(self.backup.items()):
            *path, last = key.split(".")
            obj = self.model
            for part in path:
                obj = getattr(obj, part)
            setattr(obj, last, weight)
        self.backup.clear()


class InterruptProcessingException(Exception):
    pass


class ModelManagement:
    """The parts of comfy.model_management the pack calls: loading and the interrupt flag."""

    InterruptProcessingException = InterruptProcessingException
    OOM_EXCEPTION = torch.cuda.OutOfMemoryError

    def __init__(self) -> None:
        self.loaded: FakeModelPatcher | None = None
        self.interrupt_processing = False
        self.load_calls = 0

    def load_models_gpu(self, models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False) -> None:
        for patcher in models:
            self.load_calls += 1
            if self.loaded is not None and self.loaded is not patcher:
                self.loaded.unpatch_model()
            if self.loaded is not patcher:
                patcher.patch_model()
            self.loaded = patcher

    def unload_all_models(self) -> None:
        if self.loaded is not None:
            self.loaded.unpatch_model()
            self.loaded = None

    def interrupt_current_processing(self, value: bool = True) -> None:
        self.interrupt_processing = value

    def processing_interrupted(self) -> bool:
        return self.interrupt_processing

    def throw_exception_if_processing_interrupted(self) -> None:
        if self.interrupt_processing:
            self.interrupt_processing = False
            raise InterruptProcessingException()

    def get_torch_device(self):
        return torch.device("cpu")

    def soft_empty_cache(self, force: bool = False) -> None:
        pass


def pad_by_repetition(contexts: list[torch.Tensor]) -> torch.Tensor:
    """CONDCrossAttn.concat: pad every context to the lcm of their lengths by repeating it, then concatenate."""
    length = 1
    for c in contexts:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])


def calc_cond_batch(patcher: FakeModelPatcher, contexts: list[torch.Tensor], x: torch.Tensor,
                    sigma: torch.Tensor, management: ModelManagement | None = None) -> list[torch.Tensor]:
    """Run several conds (e.g. [cond, uncond]) in one batch as sampling does; returns one denoised x0 each.

    Loads the patcher first (baking its weight patches), pads the contexts by repetition and passes a copy of
    model_options["transformer_options"] with cond_or_uncond, sigmas and uuids added."""
    (management or ModelManagement()).load_models_gpu([patcher])
    n = len(contexts)
    transformer_options = patcher.model_options["transformer_options"].copy()
    transformer_options["cond_or_uncond"] = list(range(n))
    transformer_options["uuids"] = [uuid.uuid4() for _ in range(n)]
    transformer_options["sigmas"] = torch.cat([sigma] * n)
    out = patcher.model.apply_model(torch.cat([x] * n), torch.cat([sigma] * n), c_crossattn=pad_by_repetition(contexts),
                                    transformer_options=transformer_options)
    return list(out.chunk(n))
