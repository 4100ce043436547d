"""The side-by-side benchmark on the toy world under protocol v2 (docs/benchmark.md; metrics:
erasure_core.toy.evaluation): several methods, several targets, the same seeds, one resumable run.

For every target, preservation gets only the vocabulary's fixed named neighbours (or nothing: the
`--preserve none` rows); retention is scored separately on those and on the held-out concepts no training saw.
The base model's images are generated once per target; every method is trained with the same seed and settings,
applied, judged on the same prompts and seeds, at half strength, optionally attacked (erasure_core.attacks), and
stacked with its patch for a second target. Beside the metrics it records what an erasure costs: training
seconds, peak memory and patch bytes. Each finished row is written at once, so an interrupted run resumes."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Callable

import torch

from ..engine import TrainConfig
from .evaluation import ErasureTarget, ProtocolCounts, evaluate_protocol, strength_curve
from ..methods import get_method, method_names, train_patch
from ..patch import save_patch
from .world import OBJECT_NAMES, STYLE_NAMES, concept, training_prompt

PROTOCOL = "v2"
PRESERVE_MODES = ("named", "none")


class PeakMemory:
    """Peak memory while a block runs: CUDA's allocator peak on a GPU, the process's resident set on the CPU
    (sampled every 20 ms, reported above what was resident at the start). Also the block's share of the CPU
    it could have had (process CPU time / (wall time × torch threads)): near 1 when it ran alone, lower where
    other work competed, so a contaminated wall time can be told from a clean one."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak_bytes = 0
        self.cpu_share = 1.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        self._clock = (time.process_time(), time.perf_counter())
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
        cpu, wall = time.process_time() - self._clock[0], time.perf_counter() - self._clock[1]
        self.cpu_share = cpu / max(wall * torch.get_num_threads(), 1e-9)
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, self._rss()) - self._start


def run_benchmark(denoiser, oracle, methods: list[str], targets: list[str], base_config: TrainConfig,
                  out_dir: Path, alternatives: dict[str, str] | None = None,
                  preserve_modes: tuple[str, ...] = PRESERVE_MODES, counts: ProtocolCounts = ProtocolCounts(),
                  sample_steps: int = 10, attacks: list[str] | None = None, stack: bool = True,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Train, judge and (with `attacks`) attack every (preserve mode, target, method); once the first two targets
    are done, stack each method's patches for them. Writes patches, bench.json and bench.md to `out_dir`."""
    from ..attacks import attack_report, control_rate

    out_dir.mkdir(parents=True, exist_ok=True)
    alternatives = alternatives or {}
    attacks = attacks or []
    settings = _settings(base_config, counts, sample_steps, preserve_modes, attacks, denoiser.device)
    state = _earlier_state(out_dir / "bench.json", settings, progress)
    # rows carry their preserve mode: a run of one mode adds to an earlier run's rows of the other
    settings["preserve_modes"] = list(dict.fromkeys([*state["preserve_modes"], *preserve_modes]))
    rows, stacked, base_attacks, controls = state["rows"], state["stacked"], state["base_attacks"], state["controls"]
    for name, now in settings["attacks"].items():  # an attack changed, not the erasures: run that attack again
        if state["attacks"].get(name) != now:
            for entries in [*base_attacks.values(), *(row.get("attacks", {}) for row in rows)]:
                entries.pop(name, None)
    vocabulary = denoiser.vocabulary
    bases: dict[str, dict] = {}
    found: dict[str, dict] = {}  # target -> attack name -> (entry, Found) against the unedited model

    def save() -> None:
        results = {"settings": settings, "rows": rows, "stacked": stacked, "base_attacks": base_attacks,
                   "controls": controls}
        (out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")

    def attack(patch, target: str, names: list[str]) -> dict:
        """The named attacks on one patch; the unedited model's runs are made once per target and recorded."""
        report = attack_report(denoiser, oracle, [(patch, 1.0)], target, names,
                               base_entries=found.setdefault(target, {}), control=controls[target])
        base_attacks.setdefault(target, {}).update({n: e for n, (e, _) in found[target].items()})
        return report

    def stack_first_two() -> None:
        """Each method's named patches for the first two targets attached together."""
        first, second = targets[:2]
        stacked_base: dict = {}  # the unedited model's side, the same for every method
        for method in methods:
            if any(s["method"] == method for s in stacked):
                continue
            if progress:
                progress(f"stacked {first} + {second}: {method}")
            patches = [(_train(denoiser, base_config, t, method, vocabulary.named_neighbours(t), alternatives,
                               out_dir / f"{t}-{method}-named.safetensors", measured=False)[0], 1.0)
                       for t in (first, second)]  # the stacked table reports no training times
            stacked.append({"method": method, "targets": [first, second],
                            **_stacked_report(denoiser, oracle, patches, first, second, counts, sample_steps,
                                              stacked_base)})
            save()

    for mode in preserve_modes:
        for target in targets:
            named = vocabulary.named_neighbours(target)
            kept = named if mode == "named" else []
            erasure = ErasureTarget.from_names(target, alternatives.get(target, ""))
            if target not in controls:  # the rate that finding nothing scores, beside every attack and phrasing
                controls[target] = control_rate(denoiser, oracle, target)
                save()
            for method in methods:
                done = next((r for r in rows if r["target"] == target and r["method"] == method and
                             r["preserve"] == mode), None)
                if done is not None:  # finished in an earlier, interrupted run with the same settings
                    missing = [n for n in attacks if n not in done.get("attacks", {})] if mode == "named" else []
                    again = missing + (["strengths"] if "ua_by_strength" not in done else [])
                    if again:
                        if progress:
                            progress(f"{target}: {method}, preserve {mode}: measured again ({', '.join(again)})")
                        patch = _train(denoiser, base_config, target, method, kept, alternatives,
                                       out_dir / f"{target}-{method}-{mode}.safetensors")[0]
                        if missing:
                            merged = {**done.get("attacks", {}), **attack(patch, target, missing)}
                            done["attacks"] = {n: merged[n] for n in attacks}
                        if "ua_by_strength" not in done:
                            done["ua_by_strength"] = strength_curve(denoiser, [(patch, 1.0)], oracle, erasure,
                                                                    counts=counts, steps=sample_steps)
                        save()
                    continue
                if progress:
                    progress(f"{target}: {method}, preserve {mode}")
                patch, result, memory, path = _train(denoiser, base_config, target, method, kept, alternatives,
                                                     out_dir / f"{target}-{method}-{mode}.safetensors")
                report = evaluate_protocol(denoiser, [(patch, 1.0)], oracle,
                                           _with_alternative(erasure, patch.alternative), named, counts,
                                           sample_steps, base=bases.setdefault(target, {}))
                report.pop("images")
                curve = strength_curve(denoiser, [(patch, 1.0)], oracle, erasure, counts=counts, steps=sample_steps)
                row = {"target": target, "method": method, "preserve": mode, "named_neighbours": named,
                       "alternative": patch.alternative or None, **report,
                       "ua_half_strength": curve["0.5"], "ua_by_strength": curve,
                       "train_seconds": round(result.seconds, 2), "train_cpu_share": round(memory.cpu_share, 2),
                       "peak_memory_bytes": memory.peak_bytes,
                       "patch_bytes": path.stat().st_size}
                if attacks and mode == "named":
                    row["attacks"] = attack(patch, target, attacks)
                rows.append(row)
                save()
            if stack and len(targets) >= 2 and mode == preserve_modes[0] and target == targets[1]:
                stack_first_two()  # now, while this run has both targets' patches at hand
    save()
    results = json.loads((out_dir / "bench.json").read_text())
    (out_dir / "bench.md").write_text(markdown(results) + "\n")
    return results


def _with_alternative(erasure: ErasureTarget, alternative: str) -> ErasureTarget:
    """ALT is scored only where the method was given the alternative."""
    return erasure if alternative else replace(erasure, alternative=None)


def _train(denoiser, base_config: TrainConfig, target: str, method: str, kept: list[str],
           alternatives: dict[str, str], path: Path, measured: bool = True):
    """Train one patch (or load it, when an earlier run of the same settings left it) and save it. `measured`:
    the caller reports the training's time and memory, so a left patch that did not record them is retrained."""
    from ..patch import load_patch

    alternative = alternatives.get(target, "")
    spec = get_method(method)
    held_out = [n for n in (*OBJECT_NAMES, *STYLE_NAMES) if n != target and n not in kept]
    config = replace(base_config, concept=training_prompt(target), method=method,
                     alternative=training_prompt(alternative) if alternative and spec.takes_alternative else "",
                     preserve=[training_prompt(k) for k in kept],
                     # a candidate search (Adversarial Preservation's) may not find what is scored as held out
                     candidate_exclude=[noun for n in held_out for noun in concept(n).nouns])
    if path.exists():  # left by an interrupted run: reused with the measurements it recorded, retrained without
        from ..methods.registry import TrainResult

        patch = load_patch(path)
        if not measured or ("cpu_share" in patch.training and "peak_memory_bytes" in patch.training):
            memory = PeakMemory(denoiser.device)
            memory.cpu_share = patch.training.get("cpu_share", 0.0)
            memory.peak_bytes = patch.training.get("peak_memory_bytes", 0)
            return patch, TrainResult(patch, seconds=patch.training.get("seconds", 0.0)), memory, path
    with PeakMemory(denoiser.device) as memory:
        result = train_patch(denoiser, config)
    patch = result.patch
    patch.training.update(cpu_share=round(memory.cpu_share, 2), peak_memory_bytes=memory.peak_bytes)
    patch.concepts, patch.preserve = [target], kept
    patch.alternative = alternative if config.alternative else ""
    return patch, result, memory, save_patch(patch, path)


def _stacked_report(denoiser, oracle, patches: list, first: str, second: str, counts: ProtocolCounts,
                    steps: int, base: dict | None = None) -> dict:
    """Two patches attached at once: does each erasure hold, and what does retention of the concepts that
    neither training saw become (base beside)? `base` keeps the unedited model's report between calls."""
    from .multi_benchmark import joint_report

    named = set(denoiser.vocabulary.named_neighbours(first)) | set(denoiser.vocabulary.named_neighbours(second))
    return joint_report(denoiser, oracle, patches, [first, second], named, counts, steps, base)


def _earlier_state(path: Path, settings: dict, progress: Callable[[str], None] | None = None) -> dict:
    """Rows of an earlier run with the same erasure settings, so that an interrupted benchmark resumes (or a run
    of other methods, targets or preserve modes adds to it), the attack settings they were attacked with
    ("attacks") and their preserve modes. An earlier file of other settings is moved aside, never overwritten."""
    empty = {"rows": [], "stacked": [], "base_attacks": {}, "controls": {}, "attacks": settings["attacks"],
             "preserve_modes": []}
    if not path.exists():
        return empty
    earlier = json.loads(path.read_text())
    ignored = ("date", "torch_threads", "attacks", "preserve_modes")
    strip = lambda d: {k: v for k, v in d.items() if k not in ignored}  # noqa: E731
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory()
                for f in fields(TrainConfig)}
    train = {k: v for k, v in settings["train"].items()  # a field added later, at its default, is what the
             if k in earlier.get("settings", {}).get("train", {}) or v != defaults.get(k)}  # earlier rows ran with
    if strip(earlier.get("settings", {})) != strip({**settings, "train": train}):
        aside = next(path.with_name(f"bench.earlier-{k}.json") for k in range(1, 10_000)
                     if not path.with_name(f"bench.earlier-{k}.json").exists())
        path.replace(aside)
        if progress:
            progress(f"{path.name} held rows of other settings: moved to {aside.name}")
        return empty
    return {**{k: earlier.get(k, v) for k, v in empty.items() if k not in ("attacks", "preserve_modes")},
            "attacks": earlier["settings"].get("attacks", {}),
            "preserve_modes": earlier["settings"].get("preserve_modes", [])}


def _settings(config: TrainConfig, counts: ProtocolCounts, sample_steps: int, preserve_modes, attacks,
              device) -> dict:
    from dataclasses import asdict

    from ..attacks import settings_for

    return {"protocol": PROTOCOL, "train": {k: v for k, v in vars(config).items() if k not in ("concept", "method",
                                                                                              "preserve")},
            "counts": asdict(counts), "sample_steps": sample_steps, "preserve_modes": list(preserve_modes),
            "attacks": {name: asdict(settings_for(name)) for name in attacks},
            "device": str(torch.device(device).type), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


def _r(entry: dict | None) -> str:
    """A rate as "0.94 [0.85, 0.98]"; "–" where there is none."""
    if entry is None:
        return "–"
    lo, hi = entry["interval"]
    return f"{entry['rate']:.2f} [{lo:.2f}, {hi:.2f}]"


VALID_ASR = 0.8  # an attack that finds the concept in fewer unedited images than this proves nothing by failing


CLEAN_CPU_SHARE = 0.75


def _shared(row: dict) -> str:
    """‡ where training did not have the CPU to itself (rows from before the share was recorded: no mark)."""
    return "‡" if row.get("train_cpu_share", 1.0) < CLEAN_CPU_SHARE else ""


def _validity(entry: dict | None) -> str:
    """The attack's ASR against the unedited model, with † where it failed its validity check."""
    if entry is None:
        return "–"
    return f"{entry['asr']:.2f}" + ("†" if entry["asr"] < VALID_ASR else "")


def markdown(results: dict) -> str:
    """The headline table (held-out retention first, every rate with its 95% interval, base in the first row of
    each target), then the phrasing families, the attacks and the stacked patches."""
    targets = list(dict.fromkeys(r["target"] for r in results["rows"]))
    order = {name: i for i, name in enumerate(method_names())}
    rows = sorted(results["rows"], key=lambda r: (targets.index(r["target"]), order.get(r["method"], len(order)),
                                                  PRESERVE_MODES.index(r["preserve"])))
    attacks = list(results["settings"].get("attacks", {}))
    controls = results.get("controls", {})
    head = ["target", "method", "preserve", "UA", "held-out IRA", "held-out CRA", "UA-syn", "UA at 0.5",
            "preserved IRA", "preserved CRA", "ALT", *[f"ASR {a}" for a in attacks], "control", "FD ↓",
            "layout SSIM", "train s", "peak MB", "patch KB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for r in rows:
        if r["target"] not in seen:  # the unedited model's figures for this target
            seen.add(r["target"])
            b = r["base"]
            base_asr = [_validity(results["base_attacks"].get(r["target"], {}).get(a)) for a in attacks]
            lines.append(f"| {r['target']} | *unedited* | – | {_r(b['ua'])} | {_r(b['ira_heldout'])} | "
                         f"{_r(b['cra_heldout'])} | {_r(b['ua_syn'])} | – | {_r(b['ira_preserved'])} | "
                         f"{_r(b['cra_preserved'])} | – | " + "".join(f"{v} | " for v in base_asr) +
                         f"{_r(controls.get(r['target']))} | – | – | – | – | – |")
        done = r.get("attacks", {})
        asr = [_r({"rate": done[a]["asr"], "interval": done[a]["interval"]}) +
               ("†" if done[a]["base_asr"] < VALID_ASR else "") if a in done else "–" for a in attacks]
        lines.append(f"| {r['target']}{' → ' + r['alternative'] if r['alternative'] else ''} | {r['method']} | "
                     f"{r['preserve']} | {_r(r['ua'])} | **{_r(r['ira_heldout'])}** | **{_r(r['cra_heldout'])}** | "
                     f"{_r(r['ua_syn'])} | {_r(r['ua_half_strength'])} | {_r(r['ira_preserved'])} | "
                     f"{_r(r['cra_preserved'])} | {_r(r['alt'])} | " + "".join(f"{a} | " for a in asr) +
                     f"– | {r['fd']:.1f} | {r['layout_ssim']:.2f} | {r['train_seconds']:.1f}{_shared(r)} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['patch_bytes'] / 1024:.0f} |")
    if controls:
        lines += ["", "control: how often the unedited model draws the target for the concept-free twin prompts (\"a "
                  "shape with stripes\" for circle, \"a circle with pattern\" for stripes): the rate an attack or a "
                  "phrasing scores by finding nothing, where the model has a default shape or style."]
    if any("†" in line for line in lines):
        lines += ["", f"† the attack found the concept in fewer than {VALID_ASR:.0%} of the unedited model's images "
                  "(its validity check), so a low ASR there does not show robustness."]
    if any(_shared(r) for r in rows):
        lines += ["", f"‡ trained while other work shared the CPU (the run had under {CLEAN_CPU_SHARE:.0%} of the "
                  "CPU time it could use): that wall time is inflated; compare the others."]
    families = list(rows[0]["phrasings"]) if rows else []
    if families:
        lines += ["", "UA on held-out phrasings (named preservation; the unedited model's UA in parentheses; control "
                  "as above):", "", "| target | method | " + " | ".join(families) + " | control |",
                  "|" + "---|" * (len(families) + 3)]
        for r in rows:
            if r["preserve"] == "named":
                control = controls.get(r["target"])
                lines.append(f"| {r['target']} | {r['method']} | " + " | ".join(
                    f"{_r(r['phrasings'][f])} ({r['base']['phrasings'][f]['rate']:.2f})" for f in families) +
                    (f" | {control['rate']:.2f} |" if control else " | – |"))
    if results.get("stacked"):
        s0 = results["stacked"][0]
        t1, t2 = s0["targets"]
        lines += ["", f"Two patches stacked ({t1} + {t2}, named preservation; held-out = named by neither):", "",
                  f"| method | UA {t1} | UA {t2} | held-out IRA ({t1} axis) | held-out CRA ({t1} axis) |",
                  "|---|---|---|---|---|"]
        for s in [{"method": "*unedited*", **s0["base"]}] + results["stacked"]:
            lines.append(f"| {s['method']} | {_r(s[f'ua_{t1}'])} | {_r(s[f'ua_{t2}'])} | "
                         f"{_r(s.get(f'ira_heldout_{t1}_axis'))} | {_r(s.get(f'cra_heldout_{t1}_axis'))} |")
    return "\n".join(lines)
