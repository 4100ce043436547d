"""ComfyUI entry point of the concept-erasure node pack.

ComfyUI imports this folder from custom_nodes/ as a package (its name may contain a hyphen, e.g.
"comfyui-concept-erasure"). It must also import cleanly where ComfyUI is absent (tests, pip installs), so
nothing here touches ComfyUI modules at import time beyond registering the `models/erasures` folder when
ComfyUI's `folder_paths` is there.

The pack folder is not pip-installed inside ComfyUI, so `erasure_core` is made importable from it: when it is not
importable already (an editable install), this folder goes on sys.path just long enough to import it, so that
names such as `nodes` in this folder never shadow ComfyUI's own modules.
"""
import importlib
import importlib.util
import os
import sys


def _ensure_erasure_core() -> None:
    if "erasure_core" in sys.modules:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        spec = importlib.util.find_spec("erasure_core")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        return
    sys.path.insert(0, here)
    try:
        importlib.import_module("erasure_core")
    finally:
        sys.path.remove(here)


if __package__:
    _ensure_erasure_core()
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module, not as ComfyUI's package: pytest does this to a checkout's root when the
    # folder's name is no valid package name (a clone into "concept-erasure"). There is nothing to register.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
