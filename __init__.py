"""ComfyUI entry point of the concept-erasure node pack.

ComfyUI imports this file from custom_nodes/. It must also import cleanly where
ComfyUI is absent (tests, pip installs), so nothing here touches ComfyUI modules.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
