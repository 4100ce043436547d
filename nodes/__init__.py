"""ComfyUI nodes: thin wrappers that translate ComfyUI objects and call erasure_core.

Node ids are prefixed "ConceptErasure" so they never collide with other packs.
The nodes themselves arrive with the ComfyUI adapter; until then the pack
registers nothing.
"""
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
