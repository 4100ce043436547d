"""Load Erasure Patch and Save Erasure Patch: `.safetensors` files in `models/erasures`."""
from __future__ import annotations

import dataclasses
import os
import re

from erasure_core.patch import load_patch, save_patch

from .common import CATEGORY, FOLDER, PATCH_TYPE, folder_paths_module, patch_input, require_patch


class ConceptErasureLoadPatch:
    DESCRIPTION = ("Loads an erasure patch (.safetensors) from models/erasures. The file is validated: only "
                   "safetensors, known keys, finite values. Connect it to Apply Erasure Patch.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (PATCH_TYPE,)
    RETURN_NAMES = ("erasure_patch",)
    OUTPUT_TOOLTIPS = ("The patch: concept memory and/or attention weight deltas, with what it erases.",)

    @classmethod
    def INPUT_TYPES(cls):
        from erasure_core.sae import SAE_SUFFIX

        # SAeUron's shared SAE files live beside the patches that use them, and are no patches themselves
        files = [f for f in folder_paths_module().get_filename_list(FOLDER) if not f.endswith(SAE_SUFFIX)]
        return {"required": {"patch_name": (files, {"tooltip": "A patch file in models/erasures."})}}

    @classmethod
    def IS_CHANGED(cls, patch_name):
        """Reload when the file changes on disk."""
        path = folder_paths_module().get_full_path(FOLDER, patch_name)
        if path is None:
            return ""
        stat = os.stat(path)
        return f"{stat.st_mtime_ns}:{stat.st_size}"

    def load(self, patch_name):
        path = folder_paths_module().get_full_path(FOLDER, patch_name)
        if path is None:
            raise FileNotFoundError(f"no erasure patch named {patch_name!r} in models/{FOLDER}")
        return (load_patch(path),)


_SAFE = re.compile(r"[^\w.\- ]+")


def _target(folder: str, filename: str) -> str:
    """A new .safetensors path inside `folder` for `filename` (subfolders allowed, never outside; no overwrite)."""
    name = filename.strip().replace("\\", "/")
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    parts = [_SAFE.sub("_", p).strip(" .") for p in name.split("/") if p.strip(" .")]
    if not parts:
        raise ValueError("give the patch a file name")
    root = os.path.abspath(folder)
    base = os.path.join(root, *parts)
    if os.path.commonpath([root, os.path.abspath(base)]) != root:
        raise ValueError(f"{filename!r} points outside models/{FOLDER}")
    path, counter = base + ".safetensors", 1
    while os.path.exists(path):
        path = f"{base}_{counter:05d}.safetensors"
        counter += 1
    return path


class ConceptErasureSavePatch:
    DESCRIPTION = ("Saves an erasure patch to models/erasures as one .safetensors file with its full metadata "
                   "(what it erases, method, layers, base model and fingerprint, training settings, seed), ready "
                   "to share. Never overwrites: a number is appended when the name is taken.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
                    "erasure_patch": patch_input("The patch to save, e.g. from Train Erasure Patch."),
                    "filename": ("STRING", {"default": "erasure", "tooltip": "File name inside models/erasures "
                                            "(subfolders with /); .safetensors is added."}),
                },
                "optional": {
                    "title": ("STRING", {"default": "", "tooltip": "modelspec.title; empty: 'erase <concept>'."}),
                    "description": ("STRING", {"default": "", "multiline": True,
                                               "tooltip": "modelspec.description; empty: generated."}),
                }}

    def save(self, erasure_patch, filename, title="", description=""):
        patch = require_patch(erasure_patch)
        if title or description:
            patch = dataclasses.replace(patch, title=title or patch.title,
                                        description=description or patch.description)
        folder_paths = folder_paths_module()
        folder = os.path.join(folder_paths.models_dir, FOLDER)  # listed by Load Erasure Patch whatever else is set
        path = save_patch(patch, _target(folder, filename))
        shown = os.path.relpath(path, folder).replace(os.sep, "/")
        return {"ui": {"text": [f"saved models/{FOLDER}/{shown}"]}}
