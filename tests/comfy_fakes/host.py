"""Fake ComfyUI host modules (`comfy`, `comfy.utils`, `comfy.model_management`, `folder_paths`), CLIP and VAE.

`install(tmp_path)` puts them into sys.modules the way ComfyUI's process has them when it imports custom nodes,
and `execute(node, **inputs)` runs a node function the way ComfyUI's executor does: under torch.inference_mode().
"""
from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager

import pytest
import torch

from .patcher import ModelManagement


class ProgressBarLog:
    """comfy.utils.ProgressBar, recording every update. As in ComfyUI, every update calls the global progress
    hook, and the server's hook (main.py) raises the interrupt when the user has pressed Cancel."""

    updates: list[tuple[int, int]] = []
    hook = None  # comfy.utils.set_progress_bar_global_hook sets it

    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = value
        ProgressBarLog.updates.append((value, self.total))
        if ProgressBarLog.hook is not None:
            ProgressBarLog.hook(self.current, self.total, preview)

    def update(self, value):
        self.update_absolute(self.current + value, self.total)


def _folder_paths_module(base: str) -> types.ModuleType:
    """folder_paths: models_dir, folder_names_and_paths {name: ([paths], {extensions})}, lookups."""
    fp = types.ModuleType("folder_paths")
    fp.base_path = base
    fp.models_dir = os.path.join(base, "models")
    fp.output_directory = os.path.join(base, "output")
    fp.temp_directory = os.path.join(base, "temp")
    fp.input_directory = os.path.join(base, "input")
    fp.folder_names_and_paths = {
        "checkpoints": ([os.path.join(fp.models_dir, "checkpoints")], {".ckpt", ".safetensors"}),
        "loras": ([os.path.join(fp.models_dir, "loras")], {".safetensors", ".pt"}),
    }
    fp.filename_list_cache = {}

    def add_model_folder_path(name, path, is_default=False):
        if name in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[name][0]
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)
        else:
            fp.folder_names_and_paths[name] = ([path], set())

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0][:]

    def get_filename_list(name):
        paths, extensions = fp.folder_names_and_paths[name]
        out = set()
        for folder in paths:
            if not os.path.isdir(folder):
                continue
            for root, _, files in os.walk(folder):
                for f in files:
                    if os.path.splitext(f)[1].lower() in extensions:
                        out.add(os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/"))
        return sorted(out)

    def get_full_path(name, filename):
        if name not in fp.folder_names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for folder in fp.folder_names_and_paths[name][0]:
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                return path
        return None

    def get_full_path_or_raise(name, filename):
        path = get_full_path(name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return path

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    fp.get_full_path_or_raise = get_full_path_or_raise
    fp.get_temp_directory = lambda: fp.temp_directory
    fp.get_output_directory = lambda: fp.output_directory
    fp.get_input_directory = lambda: fp.input_directory
    return fp


class FakeHost:
    def __init__(self, base: str):
        self.management = ModelManagement()
        self.folder_paths = _folder_paths_module(base)
        comfy = types.ModuleType("comfy")
        comfy.__path__ = []
        utils = types.ModuleType("comfy.utils")
        utils.ProgressBar = ProgressBarLog
        ProgressBarLog.hook = lambda value, total, preview, node_id=None: \
            self.management.throw_exception_if_processing_interrupted()
        mm = types.ModuleType("comfy.model_management")
        for name in ("load_models_gpu", "processing_interrupted", "throw_exception_if_processing_interrupted",
                     "interrupt_current_processing", "get_torch_device", "soft_empty_cache", "unload_all_models"):
            setattr(mm, name, getattr(self.management, name))
        mm.InterruptProcessingException = self.management.InterruptProcessingException
        mm.OOM_EXCEPTION = self.management.OOM_EXCEPTION
        comfy.utils, comfy.model_management = utils, mm
        server = types.ModuleType("server")
        server.PromptServer = FakePromptServer
        FakePromptServer.instance = FakePromptServer()
        self.modules = {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm,
                        "folder_paths": self.folder_paths, "server": server}

    @property
    def node_texts(self) -> list[tuple[str, str]]:
        """What was shown on nodes: (node id, text)."""
        return self.modules["server"].PromptServer.instance.texts


class FakePromptServer:
    """server.PromptServer: send_progress_text(text, node_id) draws text under the node in the stock front end."""

    instance = None

    def __init__(self):
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((node_id, text))


@contextmanager
def installed(base: str):
    """ComfyUI's modules present in sys.modules for the duration (restored afterwards)."""
    host = FakeHost(base)
    saved = {name: sys.modules.get(name) for name in host.modules}
    sys.modules.update(host.modules)
    ProgressBarLog.updates = []
    try:
        yield host
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def execute(node_class, **inputs):
    """Run a node as ComfyUI's executor does: a fresh instance, its FUNCTION, under inference mode, with the
    hidden inputs it declares (UNIQUE_ID: the node's id in the graph)."""
    hidden = node_class.INPUT_TYPES().get("hidden", {})
    inputs = {**{name: "7" for name, kind in hidden.items() if kind == "UNIQUE_ID"}, **inputs}
    with torch.inference_mode():
        return getattr(node_class(), node_class.FUNCTION)(**inputs)


class FakeCLIP:
    """comfy.sd.CLIP: tokenize(text) -> {"l": [[(id, weight), ...]]}; encode_from_tokens(tokens, return_pooled)."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.encoded: list[str] = []

    def tokenize(self, text):
        ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True).input_ids
        return {"l": [[(i, 1.0) for i in ids]]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        ids = torch.tensor([[t[0] for t in tokens["l"][0]]])
        self.encoded.append(self.tokenizer.decode(ids[0], skip_special_tokens=True))
        out = self.text_encoder(ids)
        return (out[0], out[1]) if return_pooled else out[0]


class FakeVAE:
    """comfy.sd.VAE for a pixel-space model: IMAGE (B,H,W,3) in [0,1] <-> "latent" (B,3,H,W) in [-1,1]."""

    downscale_ratio = 1

    def encode(self, pixels):
        return pixels[..., :3].movedim(-1, 1) * 2 - 1

    def decode(self, latent):
        return ((latent.clamp(-1, 1) + 1) / 2).movedim(1, -1)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two, and far faster on a CPU shared with other jobs
    (threads that wait on each other while the cores are busy elsewhere). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_pack(folder, name: str):
    """Import a node pack folder the way ComfyUI's load_custom_node does: a package named after the folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
