"""AUTOMATIC1111 / Forge install hook: pip-install what the WebUI lacks.

The WebUI already ships torch; this only adds the libraries erasure_core needs.
"""
import launch

REQUIREMENTS = {"diffusers": "diffusers>=0.30", "safetensors": "safetensors>=0.4", "transformers": "transformers"}

for module, spec in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f'install "{spec}"', f"concept-erasure requirement: {spec}")
