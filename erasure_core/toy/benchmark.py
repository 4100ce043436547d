"""The side-by-side benchmark on the toy world (metrics: erasure_core.toy.evaluation): several methods, several
targets, the same seeds, one run.

For every target the base model's images are generated once; every method is then trained with the same seed
and settings, applied, and judged by the oracle on the same prompts and seeds. Beside the erasure metrics it
records what an erasure costs: training seconds, peak memory and patch bytes."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..engine import TrainConfig
from .evaluation import ErasureTarget, evaluate_erasure
from ..methods import get_method, method_names, train_patch
from ..patch import save_patch
from .world import training_prompt

METRICS = ("ua", "ua_syn", "ira", "cra", "alt", "fd", "drift", "layout_ssim")


class PeakMemory:
    """Peak memory while a block runs: CUDA's allocator peak on a GPU, the process's resident set on the CPU
    (sampled every 20 ms, reported above what was resident at the start)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start, self._peak, self._stop = self._rss(), self._rss(), threading.Event()

        def watch() -> None:
            while not self._stop.wait(0.02):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, self._rss()) - self._start


def run_benchmark(denoiser, oracle, methods: list[str], targets: list[str], base_config: TrainConfig,
                  out_dir: Path, alternatives: dict[str, str] | None = None, preserve: bool = True,
                  seeds_per_cell: int = 1, sample_steps: int = 20,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Train and judge every (target, method) pair with the same seeds; write patches, JSON and Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    alternatives = alternatives or {}
    settings = _settings(base_config, seeds_per_cell, sample_steps, preserve, denoiser.device)
    rows = _finished_rows(out_dir / "bench.json", settings)
    for target in targets:
        alternative = alternatives.get(target, "")
        kept = denoiser.vocabulary.default_preserve(target) if preserve else []
        base: dict = {}
        for method in methods:
            if any(r["target"] == target and r["method"] == method for r in rows):
                continue  # finished in an earlier, interrupted run with the same settings
            if progress:
                progress(f"{target}: {method}")
            config = replace(base_config, concept=training_prompt(target), method=method,
                             alternative=training_prompt(alternative) if alternative and
                             get_method(method).takes_alternative else "",
                             preserve=[training_prompt(k) for k in kept])
            with PeakMemory(denoiser.device) as memory:
                result = train_patch(denoiser, config)
            patch = result.patch
            patch.concepts, patch.preserve = [target], kept
            patch.alternative = alternative if config.alternative else ""
            path = save_patch(patch, out_dir / f"{target}-{method}.safetensors")
            report, _ = evaluate_erasure(denoiser, [(patch, 1.0)], oracle,
                                         ErasureTarget.from_names(target, patch.alternative),
                                         seeds_per_cell=seeds_per_cell, steps=sample_steps, base=base)
            rows.append({"target": target, "method": method, "alternative": patch.alternative or None,
                         **{k: report[k] for k in METRICS}, "base": {k: report["base"][k] for k in METRICS},
                         "train_seconds": round(result.seconds, 2), "peak_memory_bytes": memory.peak_bytes,
                         "patch_bytes": path.stat().st_size})
            (out_dir / "bench.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    results = {"settings": settings, "rows": rows}
    (out_dir / "bench.md").write_text(markdown(results) + "\n")
    return results


def _finished_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run with the same settings, so that an interrupted benchmark resumes."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    same = lambda a, b: {k: v for k, v in a.items() if k != "date"} == {k: v for k, v in b.items() if k != "date"}  # noqa: E731
    return earlier["rows"] if same(earlier["settings"], settings) else []


def _settings(config: TrainConfig, seeds_per_cell: int, sample_steps: int, preserve: bool, device) -> dict:
    return {"train": {k: v for k, v in vars(config).items() if k not in ("concept", "method")},
            "seeds_per_cell": seeds_per_cell, "sample_steps": sample_steps,
            "preserve_every_other_concept": preserve, "device": str(torch.device(device).type),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def markdown(results: dict) -> str:
    """One row per (target, method), grouped by target, methods in registry order; the base model's value follows
    each metric in parentheses."""
    targets = list(dict.fromkeys(r["target"] for r in results["rows"]))
    order = {name: i for i, name in enumerate(method_names())}
    rows = sorted(results["rows"], key=lambda r: (targets.index(r["target"]), order.get(r["method"], len(order))))
    head = ("| target | method | UA | UA-syn | IRA | CRA | ALT | FD ↓ | drift ↓ | layout SSIM | train s | peak MB "
            "| patch KB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        b = r["base"]
        lines.append(f"| {r['target']}{' → ' + r['alternative'] if r['alternative'] else ''} | {r['method']} | "
                     f"{fmt(r['ua'])} ({fmt(b['ua'])}) | {fmt(r['ua_syn'])} ({fmt(b['ua_syn'])}) | "
                     f"{fmt(r['ira'])} ({fmt(b['ira'])}) | {fmt(r['cra'])} ({fmt(b['cra'])}) | {fmt(r['alt'])} | "
                     f"{fmt(r['fd'], 1)} | {r['drift']:.2e} | {fmt(r['layout_ssim'])} | {r['train_seconds']:.1f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['patch_bytes'] / 1024:.0f} |")
    return "\n".join(lines)
