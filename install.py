"""AUTOMATIC1111 / Forge install hook: pip-install what the WebUI lacks, and nothing it already has.

The WebUI already ships torch, gradio, numpy and Pillow; the extension also needs diffusers (its DDIM scheduler),
safetensors and transformers. A WebUI whose huggingface_hub is older than 1.0 (its pinned transformers needs
that) gets a diffusers that works with it, instead of a huggingface_hub upgrade that would break the WebUI.
"""
import importlib.metadata

import launch

REQUIREMENTS = {"diffusers": "diffusers>=0.30", "safetensors": "safetensors>=0.3", "transformers": "transformers"}


def _hub_below_1() -> bool:
    try:
        return int(importlib.metadata.version("huggingface_hub").split(".")[0]) < 1
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


for module, spec in REQUIREMENTS.items():
    if not launch.is_installed(module):
        keep = ' "huggingface_hub<1.0"' if module == "diffusers" and _hub_below_1() else ""
        launch.run_pip(f'install "{spec}"{keep}', f"concept-erasure requirement: {spec}")
