"""Fixtures and helpers shared by the test files.

Plain functions here are imported as `from conftest import checksum` (tests/ is on sys.path, as for `unets`)."""
import hashlib
import os

import pytest
import torch

# Tests run offline, on the CPU, with the shipped assets only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def toy_model():
    from erasure_core.toy.model import load_toy_model

    return load_toy_model()


@pytest.fixture(scope="session")
def oracle():
    from erasure_core.toy.classifier import load_oracle

    return load_oracle()


@pytest.fixture(scope="session")
def circle_cache(toy_model):
    """The frozen toy model's trajectories for "a circle", with "a square" as the alternative: 4 seeds x 10 DDIM
    steps (40 records), built once for every test that trains on the toy model. Methods without an alternative
    ignore its eps_alternative; a preservation list adds eps_preserve for itself (replaced when the list changes)."""
    from erasure_core.engine import TrajectoryCache

    return TrajectoryCache.build(toy_model, toy_model.encode(["a circle"]), toy_model.encode([""]),
                                 CIRCLE_CACHE["seeds"], CIRCLE_CACHE["steps"], CIRCLE_CACHE["guidance"],
                                 alternative=toy_model.encode(["a square"]))


CIRCLE_CACHE = {"seeds": [0, 1, 2, 3], "steps": 10, "guidance": 3.0}


# -- plain helpers ---------------------------------------------------------------------------------------------------


def checksum(module) -> str:
    """SHA-256 of a module's state dict (names and bytes): equal before and after means no weight moved."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def random_patch(layers, dim, seed, m=3, deltas=None, weight_shape=None, fingerprint=""):
    """A patch of random parts: m memory tokens of width `dim` on `layers`, and deltas {module: "full" | "lowrank"}
    (full: 0.1·randn; lowrank: rank 2, 0.3·randn factors, alpha 1), shapes from `weight_shape(module)`.
    Draws in the order memory k, memory v, then each delta, so it reproduces the builders it replaces."""
    from erasure_core.patch import ConceptMemory, ErasurePatch, WeightDelta

    g = torch.Generator().manual_seed(seed)
    patch = ErasurePatch(layers=list(layers), base_fingerprint=fingerprint,
                         memory=ConceptMemory(torch.randn(m, dim, generator=g), torch.randn(m, dim, generator=g)))
    for module, kind in (deltas or {}).items():
        out_dim, in_dim = weight_shape(module)
        if kind == "full":
            patch.deltas[module] = WeightDelta(full=0.1 * torch.randn(out_dim, in_dim, generator=g))
        else:
            patch.deltas[module] = WeightDelta(down=0.3 * torch.randn(2, in_dim, generator=g),
                                               up=0.3 * torch.randn(out_dim, 2, generator=g), alpha=1.0)
    return patch


@pytest.fixture(scope="session")
def trained(toy_model, circle_cache):
    """`trained(config)`: train_patch on the toy model from the shared circle cache, once per distinct config for
    the whole session (test_engine.py and test_methods.py share runs), checking that the model's own weights
    were not touched. Treat the result as read-only."""
    import json
    from dataclasses import asdict

    from erasure_core.methods import train_patch

    runs = {}

    def train(config):
        key = json.dumps(asdict(config), sort_keys=True)
        if key not in runs:
            before = checksum(toy_model.unet)
            runs[key] = train_patch(toy_model, config, cache=circle_cache)
            assert checksum(toy_model.unet) == before, f"{config.method} changed the model's own weights"
        return runs[key]

    return train


def random_branch_patch(unet, seed: int, width: int = 16, heads: int = 4, scale: float = 0.05):
    """A DuMo patch with a random branch for a diffusers `unet`'s skip layout, its output projections non-zero
    and its modulation table varied by timestep (what cross-host tests need to see)."""
    import torch

    from erasure_core.branch import branch_meta, init_branch, skip_layout
    from erasure_core.layers import base_layer, unet_modules
    from erasure_core.patch import ErasurePatch

    modules = dict(unet.named_modules())
    shapes = {name: tuple(base_layer(modules[path]).weight.shape) for name, path in unet_modules(unet).items()}
    meta = branch_meta(skip_layout(shapes), unet.config.cross_attention_dim, width, heads)
    g = torch.Generator().manual_seed(seed)
    tensors = init_branch(meta, g)
    for name, tensor in tensors.items():
        if name.startswith("out."):
            tensors[name] = scale * torch.randn(tensor.shape, generator=g)
    tensors["modulation"] = 0.5 + torch.rand(tensors["modulation"].shape, generator=g)
    return ErasurePatch(layers=[], method="dumo", concepts=["x"], feature_meta={"branch": meta},
                        extra={"branch": {f"erasure.branch.{k}": v for k, v in tensors.items()}})


def random_sae_patch(width: int, block: str, seed: int, features: int = 64, buckets: int = 10):
    """A SAeUron patch with a random SAE for a block of `width` channels: every feature selected in every bucket,
    targets and floors small, so that the edit changes most positions (what cross-host tests need to see)."""
    import torch

    from erasure_core.patch import ErasurePatch
    from erasure_core.sae import ConceptFeatures, SparseAutoencoder, concept_tensors, sae_fingerprint

    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(features, width, generator=g), dim=1)
    sae = SparseAutoencoder(w_dec.T.clone(), 0.1 * torch.randn(features, generator=g), w_dec,
                            0.1 * torch.randn(width, generator=g), k=8, threshold=0.0)
    selected = torch.rand(buckets, features, generator=g) < 0.5
    features_ = ConceptFeatures(selected, torch.rand(buckets, features, generator=g),
                                0.01 * torch.rand(buckets, features, generator=g), -2.0)
    return ErasurePatch(layers=[], method="saeuron", concepts=["x"], extra={"sae": concept_tensors(features_)},
                        feature_meta={"sae": {"block": block, "sae": sae_fingerprint(sae)}}, resolved={"sae": sae})
