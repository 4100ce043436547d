"""The oracle: a small CNN that names the object, style and colour of a picture.

It is trained on ground-truth renders with augmentations that look like the
artefacts of generated images (noise, blur, colour shifts, small warps), because
an oracle trained on clean renders alone misjudges generations badly.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .model import ASSETS
from .world import COLOUR_NAMES, OBJECT_NAMES, STYLE_NAMES, render_batch

HEADS = {"object": OBJECT_NAMES, "style": STYLE_NAMES, "colour": COLOUR_NAMES}
TRAIN_SEED0 = 10_000_000    # renders for training start here
HELDOUT_SEED0 = 20_000_000  # held-out renders start here; never trained on


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Oracle(nn.Module):
    """Input: (N,3,32,32) in [0,1]. Output: a dict of logits per head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(3, 32), _block(32, 64), _block(64, 128))
        self.trunk = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128 * 4 * 4, 256), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (used for the Frechet distance between image sets)."""
        return self.trunk(self.features(x * 2 - 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Class indices per head for images in [0,1]."""
        self.eval()
        outs = [self(x[i:i + batch]) for i in range(0, len(x), batch)]
        return {k: torch.cat([o[k] for o in outs]).argmax(1) for k in HEADS}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Make clean renders look like generations: warps, blur, colour shifts, noise."""
    n = x.shape[0]
    rand = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    # small affine warp plus a smooth random displacement field
    theta = torch.eye(2, 3).repeat(n, 1, 1)
    theta[:, :, :2] += (rand(n, 2, 2) - 0.5) * 0.12
    theta[:, :, 2] += (rand(n, 2) - 0.5) * 0.1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    flow = F.interpolate((rand(n, 2, 4, 4) - 0.5) * 0.08, size=x.shape[-2:], mode="bicubic", align_corners=False)
    x = F.grid_sample(x, grid + flow.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)
    # blur of random strength
    k = torch.tensor([0.25, 0.5, 0.25])
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :]).expand(3, 1, 3, 3), groups=3)
    a = rand(n, 1, 1, 1) * 0.8
    x = x * (1 - a) + blurred * a
    # brightness, contrast and a per-channel tint
    x = (x - 0.5) * (0.85 + 0.3 * rand(n, 1, 1, 1)) + 0.5 + (rand(n, 1, 1, 1) - 0.5) * 0.15
    x = x + (rand(n, 3, 1, 1) - 0.5) * 0.1
    # pixel noise and low-frequency blotches
    x = x + torch.randn(x.shape, generator=gen) * rand(n, 1, 1, 1) * 0.08
    blotch = F.interpolate(torch.randn(n, 3, 8, 8, generator=gen), size=x.shape[-2:], mode="bilinear",
                           align_corners=False)
    x = x + blotch * rand(n, 1, 1, 1) * 0.05
    return x.clamp(0, 1)


def render_labelled(seed0: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n ground-truth renders with their labels, from consecutive seeds."""
    imgs, scenes = render_batch(range(seed0, seed0 + n))
    labels = {k: torch.tensor([s.labels[i] for s in scenes]) for i, k in enumerate(HEADS)}
    return torch.from_numpy(imgs), labels


def accuracy(oracle: Oracle, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    pred = oracle.predict(x)
    return {k: float((pred[k] == labels[k]).float().mean()) for k in HEADS}


def train_oracle(steps: int = 1500, n_train: int = 30_000, batch: int = 128, lr: float = 2e-3,
                 seed: int = 0, out: Path = ASSETS / "oracle.safetensors") -> dict[str, float]:
    """Train the oracle, save it, and return its held-out accuracy per head."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = render_labelled(TRAIN_SEED0, n_train)
    oracle = Oracle()
    opt = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in tqdm(range(steps), desc="oracle"):
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        logits = oracle.train()(augment(x[idx], gen))
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(out))
    return accuracy(oracle, *render_labelled(HELDOUT_SEED0, 2000))


def load_oracle(path: Path = ASSETS / "oracle.safetensors") -> Oracle:
    oracle = Oracle()
    oracle.load_state_dict(load_file(str(path)))
    return oracle.eval().requires_grad_(False)
