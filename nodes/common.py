"""What the nodes share: the category, the patch type, the `models/erasures` folder and ComfyUI's services.

ComfyUI's modules (`comfy.*`, `folder_paths`) are imported inside functions only, so the pack imports cleanly
where ComfyUI is absent.
"""
from __future__ import annotations

import logging
import os

CATEGORY = "conditioning/erasure"
PATCH_TYPE = "ERASURE_PATCH"
FOLDER = "erasures"
EXTENSIONS = {".safetensors"}
LOG = logging.getLogger("concept_erasure")


def register_folder(folder_paths) -> list[str]:
    """Register `models/erasures` for `.safetensors` files, keeping any paths the user configured for "erasures"
    (extra_model_paths.yaml is read before custom nodes load). Returns the folder list."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    existing = folder_paths.folder_names_and_paths.get(FOLDER)
    paths = list(existing[0]) if existing else []
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(FOLDER, None)
    return paths


def folder_paths_module():
    """ComfyUI's folder_paths, with `erasures` registered (again, should something have replaced the entry)."""
    import folder_paths

    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None or set(entry[1]) != EXTENSIONS or os.path.join(folder_paths.models_dir, FOLDER) not in entry[0]:
        register_folder(folder_paths)
    return folder_paths


def model_management():
    import comfy.model_management

    return comfy.model_management


def progress_bar(total: int):
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def loader(training: bool = False):
    """Load the MODEL the way ComfyUI's samplers do before use: on its device, its own weight patches in place."""
    mm = model_management()

    def load(patcher) -> None:
        try:
            mm.load_models_gpu([patcher], force_full_load=training)
        except TypeError:  # ComfyUI before force_full_load
            mm.load_models_gpu([patcher])

    return load


def interrupt_check():
    return model_management().throw_exception_if_processing_interrupted


def warn(messages: list[str], node_id: str | None = None, notes: tuple[str, ...] = ()) -> None:
    """To the server log and, where ComfyUI can show text on the node, to the user, above the node's `notes`."""
    for message in messages:
        LOG.warning("[Concept Erasure] %s", message)
    if messages or notes:
        show_text([f"⚠ {m}" for m in messages] + list(notes), node_id)


def show_text(lines: list[str], node_id: str | None) -> None:
    """Text under the node (PromptServer.send_progress_text: the stock front end draws it, no JS of ours); each
    call replaces the node's earlier text."""
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text("\n".join(lines), node_id)
    except (ImportError, AttributeError):  # an older ComfyUI: the log is all there is
        pass


HIDDEN_NODE_ID = {"hidden": {"unique_id": "UNIQUE_ID"}}  # ComfyUI passes the node's id as unique_id


def patch_input(tooltip: str = "An erasure patch: from Load Erasure Patch or Train Erasure Patch."):
    return (PATCH_TYPE, {"tooltip": tooltip})


def strength_input():
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                      "tooltip": "0 leaves the model exactly as it is; 1 is the trained erasure. The memory's values "
                                 "and the weight deltas scale with it, but the erasure may stop well above 0: "
                                 "the text under the node says from which strength this patch was measured to "
                                 "erase."})


def require_patch(patch):
    if patch is None:
        raise ValueError("no erasure patch arrived here (the 'key' output of Train Erasure Patch is only produced by "
                         "the memory-key method)")
    return patch
