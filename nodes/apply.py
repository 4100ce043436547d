"""Apply Erasure Patch: MODEL + patch + strength -> a patched copy of the MODEL."""
from __future__ import annotations

from erasure_core.backends.comfy import apply_patches

from .common import CATEGORY, HIDDEN_NODE_ID, patch_input, require_patch, strength_input, warn


class ConceptErasureApplyPatch:
    DESCRIPTION = ("Applies an erasure patch to a MODEL: its concept memory joins the cross-attention context of "
                   "the layers it was trained on, and its weight deltas are added like a LoRA. The MODEL you pass "
                   "in is never changed; chain several Apply nodes to stack patches.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The MODEL with the patch applied (a clone; the input stays as it was).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x, SD2.x or SDXL) to apply the patch to."}),
            "erasure_patch": patch_input(),
            "strength": strength_input(),
        }, **HIDDEN_NODE_ID}

    def apply(self, model, erasure_patch, strength, unique_id=None):
        patch = require_patch(erasure_patch)
        patched, warnings = apply_patches(model, [(patch, strength)])
        warn(warnings, unique_id, notes=(patch.strength_note(strength),))  # under the node, beside its slider
        return (patched,)
