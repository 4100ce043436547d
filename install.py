"""Install hook. AUTOMATIC1111 / Forge: pip-install what the WebUI lacks, never moving a package the WebUI pins.
ComfyUI-Manager and comfy-cli also run this file (after installing requirements.txt): there it has nothing to do.

The WebUI already ships torch, gradio, numpy and Pillow; the extension also needs diffusers (its DDIM scheduler),
safetensors and transformers. Every pip call runs under constraints made of the WebUI's own pins
(requirements_versions.txt beside launch.py), the installed torch, and huggingface_hub below 1.0 where it is
below 1.0 now (the WebUI's transformers needs that), so pip picks the newest diffusers that fits them (for
A1111 1.10's safetensors 0.4.2: diffusers 0.37) instead of upgrading what the WebUI's start-up check would put back.
"""
import importlib.metadata
import re
import sys
import tempfile
from pathlib import Path

try:
    import launch
except ImportError:  # not a WebUI: ComfyUI's node managers installed requirements.txt already
    print("concept-erasure: requirements.txt is all this pack needs here; nothing more to install")
    sys.exit(0)

REQUIREMENTS = {"diffusers": "diffusers>=0.30", "safetensors": "safetensors>=0.3", "transformers": "transformers"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def constraints() -> list[str]:
    """What pip may not move: the WebUI's pins, the installed torch, and a huggingface_hub below 1.0."""
    root = Path(getattr(launch, "__file__", None) or "launch.py").resolve().parent
    pins = root / "requirements_versions.txt"
    lines = [] if not pins.exists() else [  # pip takes no extras in a constraint
        re.sub(r"\[.*?\]", "", line.split("#")[0].strip()) for line in pins.read_text().splitlines()
        if re.match(r"^[A-Za-z0-9_.\-\[\]]+==", line.strip())]
    torch = _version("torch")
    if torch and not any(re.match(r"torch==", line) for line in lines):
        lines.append(f"torch=={torch}")
    hub = _version("huggingface_hub")
    if hub and hub.split(".")[0].isdigit() and int(hub.split(".")[0]) < 1:
        lines.append("huggingface_hub<1.0")
    return lines


missing = [spec for module, spec in REQUIREMENTS.items() if not launch.is_installed(module)]
if missing:
    with tempfile.NamedTemporaryFile("w", prefix="concept-erasure-constraints-", suffix=".txt",
                                     delete=False) as f:
        f.write("\n".join(constraints()) + "\n")
    for spec in missing:
        launch.run_pip(f'install "{spec}" -c "{f.name}"', f"concept-erasure requirement: {spec}")
    Path(f.name).unlink(missing_ok=True)
