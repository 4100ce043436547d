"""`erasure bench --multi`: several concepts erased at once, in sequence, and by stacked single patches, on the toy
world under protocol v2's images and seeds (docs/benchmark.md).

For each method, three ways to erase the same targets (2 objects and 2 styles by default), each with the same
preservation (the union of the targets' named neighbours, none of the targets):
- "together": one patch, one training run, `--concept a,b,c,d`;
- "sequence": one concept after another, each trained on top of the patches before (`--on-top-of`), ending in one
  patch that holds them all;
- "stacked": one patch per concept, trained alone and attached together.
Each gets per-target UA, held-out IRA/CRA per target's axis on the cells showing none of the targets, training
seconds, and with `attacks` every attack's ASR per target. Each finished way is saved at once (resumable)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..engine import TrainConfig
from ..methods import train_patch
from ..patch import load_patch, save_patch
from .benchmark import _r
from .evaluation import ErasureTarget, ProtocolCounts, protocol_items, rate, split_retention
from .world import OBJECT_NAMES, STYLE_NAMES, concept, training_prompt

WAYS = ("together", "sequence", "stacked")


def joint_report(denoiser, oracle, patches: list, targets: list[str], named: set[str], counts: ProtocolCounts,
                 steps: int, base: dict | None = None) -> dict:
    """Patches attached at once: UA of each target (`ua_<target>`), and retention on the cells that show none of
    the targets, split into the `named` concepts and the held-out rest, per target's axis
    (`ira_heldout_<target>_axis`, `cra_heldout_<target>_axis`). `base` keeps the unedited model's report."""
    from ..denoiser import patched

    erasures = [ErasureTarget.from_names(t) for t in targets]
    groups = {t: protocol_items(e, counts)["target"] for t, e in zip(targets, erasures)}
    on_any = lambda i: any(e.label(i) == e.index for e in erasures)  # noqa: E731
    other = [i for i in protocol_items(erasures[0], counts)["other"] if not on_any(i)]
    items = [i for t in targets for i in groups[t]] + other

    def judge() -> dict:
        images = denoiser.generate([i.prompt for i in items], [i.seed for i in items], steps=steps)
        pred, out, at = oracle.predict(images), {}, 0
        for t, e in zip(targets, erasures):
            n = len(groups[t])
            out[f"ua_{t}"] = rate(pred[e.axis][at:at + n] != e.index)
            at += n
        rest = {k: v[at:] for k, v in pred.items()}
        for t, e in zip(targets, erasures):
            out.update({f"{k}_{t}_axis": v for k, v in split_retention(rest, e, other, named).items()
                        if k.endswith("heldout")})
        return out

    with patched(denoiser, patches):
        report = judge()
    base = {} if base is None else base
    if "report" not in base:
        base["report"] = judge()
    report["base"] = base["report"]
    return report


NAMED_PER_AXIS = 3  # as protocol v2 names for one target: the rest of each axis stays held out


def _named(vocabulary, targets: list[str]) -> list[str]:
    """The preserved concepts: the targets' named neighbours in turn, at most NAMED_PER_AXIS per axis, none of
    the targets, so that every axis keeps held-out concepts to score."""
    lists = [[n for n in vocabulary.named_neighbours(t) if n not in targets] for t in targets]
    named: list[str] = []
    for rank in range(max(map(len, lists))):
        for names in lists:
            if rank < len(names) and names[rank] not in named and \
                    sum(concept(m).axis == concept(names[rank]).axis for m in named) < NAMED_PER_AXIS:
                named.append(names[rank])
    return named


def run_multi_benchmark(denoiser, oracle, methods: list[str], targets: list[str], base_config: TrainConfig,
                        out_dir: Path, counts: ProtocolCounts = ProtocolCounts(), sample_steps: int = 10,
                        attacks: list[str] | None = None,
                        progress: Callable[[str], None] | None = None) -> dict:
    """Every method, every way (WAYS); writes patches and multi.json / multi.md to `out_dir`."""
    from ..attacks import attack_report, control_rate

    out_dir.mkdir(parents=True, exist_ok=True)
    attacks = attacks or []
    vocabulary = denoiser.vocabulary
    named = _named(vocabulary, targets)
    held_out = [n for n in (*OBJECT_NAMES, *STYLE_NAMES) if n not in targets and n not in named]
    config = replace(base_config, preserve=[training_prompt(n) for n in named],
                     candidate_exclude=[noun for n in held_out for noun in concept(n).nouns])
    settings = {"targets": targets, "named": named, "train": {k: v for k, v in vars(config).items()
                                                              if k not in ("concept", "more_concepts", "method")},
                "counts": vars(counts), "sample_steps": sample_steps, "attacks": attacks}
    path = out_dir / "multi.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    rows = earlier.get("rows", []) if earlier.get("settings") == settings else []
    base, found, controls = {}, {}, dict(earlier.get("controls", {})) if rows else {}

    def results() -> dict:
        return {"settings": settings, "rows": rows, "controls": controls}

    def save() -> None:
        path.write_text(json.dumps(results(), indent=2) + "\n")

    def trained(file: Path, method: str, erased: list[str], on_top_of: list):
        """A patch erasing `erased` and its training seconds (train_patch records them): left by an interrupted
        run, or trained now and saved."""
        if file.exists():
            patch = load_patch(file)
        else:
            prompts = [training_prompt(t) for t in erased]
            patch = train_patch(denoiser, replace(config, concept=prompts[0], more_concepts=prompts[1:],
                                                  method=method), on_top_of=on_top_of).patch
            save_patch(patch, file)
        return patch, patch.training["seconds"]

    for method in methods:
        for way in WAYS:
            if any(r["method"] == method and r["way"] == way for r in rows):
                continue
            if progress:
                progress(f"{method}: {len(targets)} concepts, {way}")
            if way == "together":
                patch, seconds = trained(out_dir / f"{method}-together.safetensors", method, targets, [])
                patches, singles = [(patch, 1.0)], []
            elif way == "sequence":
                patch, seconds = None, 0.0
                for k, target in enumerate(targets):
                    patch, took = trained(out_dir / f"{method}-sequence-{k + 1}.safetensors", method, [target],
                                          [patch] if patch is not None else [])
                    seconds += took
                patches, singles = [(patch, 1.0)], []
            else:
                singles = [trained(out_dir / f"{method}-{t}.safetensors", method, [t], []) for t in targets]
                patches, seconds = [(p, 1.0) for p, _ in singles], sum(s for _, s in singles)
            row = {"method": method, "way": way, "train_seconds": round(seconds, 2),
                   **joint_report(denoiser, oracle, patches, targets, set(named), counts, sample_steps, base)}
            if singles:
                row["one_concept_seconds"] = round(sum(s for _, s in singles) / len(singles), 2)
            if attacks:
                row["attacks"] = {}
                for target in targets:
                    if target not in controls:
                        controls[target] = control_rate(denoiser, oracle, target)
                    row["attacks"][target] = attack_report(denoiser, oracle, patches, target, attacks,
                                                           base_entries=found.setdefault(target, {}),
                                                           control=controls[target])
            rows.append(row)
            save()
    save()
    (out_dir / "multi.md").write_text(markdown(results()) + "\n")
    return results()


def markdown(results: dict) -> str:
    """One row per (method, way) and the unedited model's first: each target's UA, held-out IRA and CRA on its
    axis, training seconds (the stacked row: one concept's beside), and ASRs where attacked."""
    targets = results["settings"]["targets"]
    head = ["method", "way", *[f"UA {t}" for t in targets], *[f"held-out IRA / CRA ({t})" for t in targets],
            "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = results["rows"]
    if rows:
        b = rows[0]["base"]
        lines.append("| base | – | " + " | ".join(_r(b[f"ua_{t}"]) for t in targets) + " | " +
                     " | ".join(f"{_r(b.get(f'ira_heldout_{t}_axis'))} / {_r(b.get(f'cra_heldout_{t}_axis'))}"
                                for t in targets) + " | – |")
    for r in rows:
        seconds = f"{r['train_seconds']:.0f}" + (f" (one: {r['one_concept_seconds']:.0f})"
                                                 if "one_concept_seconds" in r else "")
        lines.append(f"| {r['method']} | {r['way']} | " + " | ".join(_r(r[f"ua_{t}"]) for t in targets) + " | " +
                     " | ".join(f"{_r(r.get(f'ira_heldout_{t}_axis'))} / {_r(r.get(f'cra_heldout_{t}_axis'))}"
                                for t in targets) + f" | {seconds} |")
    attacked = [r for r in rows if r.get("attacks")]
    if attacked:
        names = list(next(iter(attacked[0]["attacks"].values())))
        lines += ["", "| method | way | " + " | ".join(f"ASR {a} ({t})" for t in targets for a in names) + " |",
                  "|" + "---|" * (2 + len(targets) * len(names))]
        for r in attacked:
            lines.append(f"| {r['method']} | {r['way']} | " + " | ".join(
                _r({"rate": r["attacks"][t][a]["asr"], "interval": r["attacks"][t][a]["interval"]})
                for t in targets for a in names) + " |")
    return "\n".join(lines)
