"""Write a random-weight SD1.5 single-file checkpoint (the original key layout, float16, 2.1 GB) for trying the
pack and the extension in a real ComfyUI or WebUI on the CPU, as DEVELOPERS.md describes:

    python bench/random_checkpoint.py /path/to/ComfyUI/models/checkpoints/random-sd15.safetensors
"""
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ldm_checkpoint import sd15_ldm_checkpoint  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd15_ldm_checkpoint(), out)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB)")
