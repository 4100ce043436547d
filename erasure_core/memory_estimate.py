"""How much memory a training run will take above the loaded model, estimated before it starts, so that a run
that cannot fit is refused with advice instead of being killed by the kernel or the GPU allocator.

The figures are measured, not derived: `bench/train_memory.py` trained `memory` on an SD1.5-size UNet (860 M
parameters) at 512 px on the CPU in fp32 and read the rise of the resident set (bench/results/train_memory.json).
A run is scaled from them by its images per step, its pixels (activations grow with the latent area), the
UNet's parameter count against SD1.5's, and its element size (fp16: half). It is an estimate: it errs on the
generous side, and the check leaves a margin."""
from __future__ import annotations

from dataclasses import dataclass

import torch

SD15_PARAMETERS = 860e6
# GiB above the loaded model at 512 px, fp32: (fixed part, per image), from batch 1 and batch 4 of
# bench/results/train_memory.json (gradient checkpointing off: 3.63 and 14.24; on: 2.15 and 7.87)
MEASURED_GB = {False: (0.09, 3.54), True: (0.24, 1.91)}
HEADROOM = 0.9  # of what is free: the host, the cache and the previews need some too


@dataclass
class MemoryEstimate:
    needed_bytes: int
    free_bytes: int | None  # None: unknown (then nothing is refused)
    where: str

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.needed_bytes <= HEADROOM * self.free_bytes


def estimate(network: torch.nn.Module, batch: int, latent_side: int, gradient_checkpointing: bool) -> int:
    """Bytes a gradient-trained patch needs above the loaded model, for a UNet like `network` working on
    latent_side x latent_side latents (64 for SD1.5 at 512 px)."""
    parameters = sum(p.numel() for p in network.parameters())
    element = next(network.parameters()).element_size()
    fixed, per_image = MEASURED_GB[bool(gradient_checkpointing)]
    area = (latent_side / 64) ** 2
    gigabytes = (fixed + per_image * batch * area) * (parameters / SD15_PARAMETERS) * (element / 4)
    return int(gigabytes * 2**30)


def free_memory(device: torch.device) -> tuple[int | None, str]:
    """Free bytes where training will run: the GPU's (CUDA's own count) or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "of RAM available"
    except OSError:
        pass
    return None, "free (unknown on this system)"


def check(network: torch.nn.Module, batch: int, latent_side: int, gradient_checkpointing: bool) -> MemoryEstimate:
    free, where = free_memory(next(network.parameters()).device)
    return MemoryEstimate(estimate(network, batch, latent_side, gradient_checkpointing), free, where)


def advice(result: MemoryEstimate, batch: int, pixels: int, gradient_checkpointing: bool) -> str:
    """What to lower, for a run that does not fit (pixels: the training resolution)."""
    gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731  (GiB, as the measurements)
    steps = []
    if not gradient_checkpointing:
        steps.append("turn gradient checkpointing on")
    if batch > 1:
        steps.append(f"lower the batch (now {batch}) to 1")
    if pixels > 384:
        steps.append(f"lower the resolution (now {pixels}) to 384 or 256")
    steps.append("or free memory (close other programs, unload other models)")
    return (f"this run would need about {gb(result.needed_bytes)} above the loaded model and only "
            f"{gb(result.free_bytes)} is {result.where}; " + ", ".join(steps) + ". Nothing was trained.")
