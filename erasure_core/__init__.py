"""erasure_core: concept erasure for Stable Diffusion-style models.

The library behind the ComfyUI node pack and the AUTOMATIC1111/Forge extension.
"""
__version__ = "0.1.0"
