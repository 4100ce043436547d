"""Write a random-weight SD1.5 single-file checkpoint (the original key layout, float16, 2.1 GB) for trying the
pack and the extension in a real ComfyUI or WebUI on the CPU, as DEVELOPERS.md describes:

    python bench/random_checkpoint.py /path/to/ComfyUI/models/checkpoints/random-sd15.safetensors
"""
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ldm_checkpoint import sd15_ldm_checkpoint  # noqa: E402



def write_random_saeuron_patch(path: Path) -> Path:
    """A SAeUron patch for any SD1.5 checkpoint: a random SAE of 1,280 features on output_blocks.4.1 (the
    paper's object block), 30% of the features selected per bucket. save_patch writes its SAE file beside it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from erasure_core.patch import ErasurePatch, save_patch
    from erasure_core.sae import ConceptFeatures, SparseAutoencoder, concept_tensors, sae_fingerprint

    block, width, features = "output_blocks.4.1", 1280, 1280
    g = torch.Generator().manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(features, width, generator=g), dim=1)
    sae = SparseAutoencoder(w_dec.T.clone(), torch.zeros(features), w_dec, torch.zeros(width), k=32, threshold=0.0)
    chosen = ConceptFeatures(torch.rand(10, features, generator=g) < 0.3, torch.rand(10, features, generator=g),
                             torch.zeros(10, features), -5.0)
    patch = ErasurePatch(layers=[], method="saeuron", concepts=["a cat"], extra={"sae": concept_tensors(chosen)},
                         feature_meta={"sae": {"block": block, "sae": sae_fingerprint(sae)}}, resolved={"sae": sae})
    return save_patch(patch, path)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd15_ldm_checkpoint(), out)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB)")
