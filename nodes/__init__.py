"""ComfyUI nodes: thin wrappers that translate ComfyUI objects and call erasure_core.

Node ids are prefixed "ConceptErasure" so they never collide with other packs; all sit in the
`conditioning/erasure` category. ERASURE_PATCH values are erasure_core.patch.ErasurePatch objects.
"""
from __future__ import annotations

from .apply import ConceptErasureApplyPatch
from .common import register_folder
from .files import ConceptErasureLoadPatch, ConceptErasureSavePatch
from .images import ConceptErasurePreview, ConceptErasurePurifyImage
from .train import ConceptErasureTrainPatch

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "ConceptErasureLoadPatch": ConceptErasureLoadPatch,
    "ConceptErasureApplyPatch": ConceptErasureApplyPatch,
    "ConceptErasureTrainPatch": ConceptErasureTrainPatch,
    "ConceptErasureSavePatch": ConceptErasureSavePatch,
    "ConceptErasurePurifyImage": ConceptErasurePurifyImage,
    "ConceptErasurePreview": ConceptErasurePreview,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "ConceptErasureLoadPatch": "Load Erasure Patch",
    "ConceptErasureApplyPatch": "Apply Erasure Patch",
    "ConceptErasureTrainPatch": "Train Erasure Patch",
    "ConceptErasureSavePatch": "Save Erasure Patch",
    "ConceptErasurePurifyImage": "Purify Image (Erasure)",
    "ConceptErasurePreview": "Erasure Preview",
}

try:  # inside ComfyUI: make models/erasures known before any node lists it
    import folder_paths
except ImportError:
    folder_paths = None
if folder_paths is not None:
    register_folder(folder_paths)
