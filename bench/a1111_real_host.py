"""Drive a real AUTOMATIC1111 WebUI (or Forge) as a user would: train a patch from the Concept Erasure tab in the
browser at the tab's defaults for batch and resolution (sampling the WebUI process's resident memory throughout),
close a page 20 s into a second run (it must stop, not write its file), then through the API apply the patch
from the accordion and as `<erasure:name:1>` in the prompt, strength 0, and a refused file, whose reason must
reach the API's info and the page. Prints a JSON report.

    # outside this repo: the WebUI with its requirements in its venv, this extension cloned into extensions/,
    # a random-weight SD1.5 checkpoint (bench/random_checkpoint.py) and, offline, bench/hf_clip_cache.py
    HF_HUB_OFFLINE=1 python launch.py --skip-torch-cuda-test --use-cpu all --no-half --precision full --api
    python bench/a1111_real_host.py --webui /path/to/stable-diffusion-webui --pid $(pgrep -f launch.py)
    # Forge (its tab refuses training): a patch trained with `erasure train --model the-checkpoint.safetensors`
    # into models/erasures, then
    python bench/a1111_real_host.py --webui /path/to/forge --pid $(pgrep -f launch.py) --forge --patch NAME

Training is 2 steps on 1 trajectory of 2 steps and generation 64 px with 3 steps: it checks the host contract and
the memory of one training run at 512 px, not quality."""
from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

SERVER = "http://127.0.0.1:7860"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def api(path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(SERVER + path, data, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=3600).read())


class ResidentMemory:
    """Peak resident set size of one process, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.start = self.read()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def read(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.2)

    def done(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"before_gb": round(self.start / 1e9, 2), "peak_gb": round(self.peak / 1e9, 2),
                "rise_gb": round((self.peak - self.start) / 1e9, 2)}


def open_tab(page) -> None:
    """The Concept Erasure tab: a button in A1111's gradio 3.41, a role="tab" button in Forge's gradio 4."""
    tab = page.get_by_role("tab", name="Concept Erasure", exact=True)
    page.wait_for_selector("#tabs")
    (tab if tab.count() else page.get_by_role("button", name="Concept Erasure", exact=True)).first.click()


def fill_tab(page, name: str) -> None:
    page.goto(SERVER)
    open_tab(page)
    fields = {"#erasure_concept textarea": "a cat", "#erasure_steps input": "2", "#erasure_output textarea": name,
              "#erasure_cache_seeds input": "1", "#erasure_cache_steps input": "2",
              "#erasure_preview_images input": "0"}
    for selector, value in fields.items():
        box = page.locator(selector).first
        if not box.is_visible():  # the advanced fields sit in a closed accordion
            page.locator("#tab_concept_erasure").get_by_text("Advanced", exact=True).first.click()
        box.fill(value)
        box.press("Tab")


def train_in_tab(page, name: str, pid: int) -> dict:
    fill_tab(page, name)
    memory = ResidentMemory(pid)
    start = time.time()
    page.locator("#erasure_train").click()
    page.wait_for_function("() => /wrote .*\\.safetensors|error|refused|out of memory|not supported/i.test("
                           "document.querySelector('#erasure_status')?.innerText || '')", timeout=3_600_000,
                           polling=1000)
    return {"status": page.locator("#erasure_status").first.inner_text().strip()[:600],
            "seconds": round(time.time() - start, 1), "memory": memory.done()}


def closed_then_reopened(browser, erasures: Path) -> dict:
    """A1111's gradio 3.41 keeps running a closed page's job: a page opened afterwards shows it going, then done."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    page.goto(SERVER)
    open_tab(page)
    status = page.locator("#erasure_status").first
    page.wait_for_timeout(3000)
    while_running = status.inner_text().strip()
    for _ in range(40):  # until the run is done (at most 10 minutes), as a user reloading now and then
        if (erasures / "closed_page.safetensors").exists():
            break
        time.sleep(15)
    page.reload()
    open_tab(page)
    page.wait_for_timeout(3000)
    after = status.inner_text().strip()
    page.close()
    return {"patch written": (erasures / "closed_page.safetensors").exists(),
            "a page opened while it ran shows": while_running[:300], "reloaded once it finished": after[:300]}


def txt2img(prompt: str, slots: list[tuple[str, float]]) -> tuple[np.ndarray | None, dict]:
    args: list = []
    for name, strength in slots + [("None", 1.0)] * (4 - len(slots)):
        args += [name, strength]
    reply = api("/sdapi/v1/txt2img", {"prompt": prompt, "negative_prompt": "", "seed": 42, "steps": 3,
                                      "width": 64, "height": 64, "cfg_scale": 7, "sampler_name": "Euler",
                                      "alwayson_scripts": {"concept erasure": {"args": args}}})
    info = json.loads(reply.get("info") or "{}")
    images = reply.get("images") or []
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[0])))).astype(np.int16) if images else None
    return pixels, info


def saeuron_checks(erasures: Path) -> dict:
    from random_checkpoint import write_random_saeuron_patch

    write_random_saeuron_patch(erasures / "real_saeuron.safetensors")
    report: dict = {"patch folder": sorted(f.name for f in erasures.glob("*.safetensors"))}
    plain, _ = txt2img("a cat in a garden", [])
    runs = {"accordion": ("a cat in a garden", [("real_saeuron", 1.0)]),
            "tag": ("a cat in a garden <erasure:real_saeuron:1>", []),
            "strength 0": ("a cat in a garden", [("real_saeuron", 0.0)])}
    for what, (prompt, slots) in runs.items():
        pixels, info = txt2img(prompt, slots)
        report[what] = {"images": pixels is not None, "comments": info.get("comments"),
                        "extra_generation_params": info.get("extra_generation_params", {}),
                        "max pixel difference from plain": None if pixels is None else
                        int(np.abs(pixels - plain).max())}
    after, _ = txt2img("a cat in a garden", [])
    report["plain after vs plain"] = None if after is None else int(np.abs(after - plain).max())
    report["server alive afterwards"] = "state" in api("/sdapi/v1/progress")
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--webui", required=True, help="the WebUI folder")
    parser.add_argument("--pid", type=int, required=True, help="the WebUI process, for its memory")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--forge", action="store_true",
                        help="the WebUI is Forge: its tab must refuse to train (before any generation, too), and "
                             "the rest applies --patch, trained with `erasure train` as a Forge user does")
    parser.add_argument("--patch", default="", help="with --forge: the patch (a name in models/erasures) to apply")
    parser.add_argument("--saeuron-only", action="store_true",
                        help="only a SAeUron patch (random SAE, written into models/erasures with its SAE file), "
                             "from the accordion and as a tag: Forge must refuse it in words, A1111 apply it")
    args = parser.parse_args()
    if args.saeuron_only:
        report = saeuron_checks(Path(args.webui) / "models" / "erasures")
        print(json.dumps(report, indent=1))
        return
    if args.forge and not args.patch:
        parser.error("--forge needs --patch")
    report: dict = {}
    name = args.patch or "real_tab_memory"
    erasures = Path(args.webui) / "models" / "erasures"
    try:
        drive(report, name, erasures, args)
    finally:
        print(json.dumps(report, indent=1))


def drive(report: dict, name: str, erasures: Path, args) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        earlier = [erasures / "garbage.safetensors", erasures / "closed_page.safetensors",
                   *(erasures / ".checkpoints").glob("*")] + ([] if args.forge else [erasures / f"{name}.safetensors"])
        for old in earlier:  # an earlier run's
            old.unlink(missing_ok=True)
        if args.forge:  # first thing after start: Forge has not loaded its model yet
            report["tab: train before any generation (must refuse)"] = train_in_tab(page, "forge_tab", args.pid)
        else:
            report["tab: train memory at the tab's batch and resolution"] = train_in_tab(page, name, args.pid)
        report["patch file"] = sorted(f.name for f in erasures.glob("*.safetensors"))

        if not args.forge:  # a page closed mid-run: a page opened later shows the run, then what it wrote
            closed = browser.new_page(viewport={"width": 1400, "height": 1000})
            closed.set_default_timeout(120_000)
            fill_tab(closed, "closed_page")
            closed.locator("#erasure_train").click()
            closed.wait_for_timeout(20_000)
            closed.close()
            report["page closed 20 s into a run"] = closed_then_reopened(browser, erasures)

        plain, _ = txt2img("a cat in a garden", [])
        accordion, info_accordion = txt2img("a cat in a garden", [(name, 1.0)])
        tagged, info_tagged = txt2img(f"a cat in a garden <erasure:{name}:1>", [])
        zero, _ = txt2img("a cat in a garden", [(name, 0.0)])
        plain_after, _ = txt2img("a cat in a garden", [])
        report["max pixel difference"] = {
            "accordion vs plain": int(np.abs(accordion - plain).max()),
            "accordion vs <erasure:name:1>": int(np.abs(accordion - tagged).max()),
            "strength 0 vs plain": int(np.abs(zero - plain).max()),
            "plain after vs plain": int(np.abs(plain_after - plain).max())}
        report["infotext"] = {"accordion": info_accordion.get("extra_generation_params", {}),
                              "tagged": info_tagged.get("extra_generation_params", {})}

        (erasures / "garbage.safetensors").write_bytes(b"\x00" * 64)
        refused, info = txt2img("a cat <erasure:garbage:1>", [])
        report["refused file, API"] = {"images": refused is not None,
                                       "extra_generation_params": info.get("extra_generation_params", {}),
                                       "comments": info.get("comments"),
                                       "progress interrupted": api("/sdapi/v1/progress")["state"]["interrupted"]}
        page.goto(SERVER)
        page.locator("#txt2img_prompt textarea").fill("a cat <erasure:garbage:1>")
        page.locator("#txt2img_generate").click()
        page.wait_for_function("() => /Concept Erasure/.test(document.querySelector('#html_info_txt2img')?.innerText"
                               " || '')", timeout=600_000, polling=1000)
        report["refused file, page"] = page.locator("#html_info_txt2img").first.inner_text().strip()[:400]
        page.screenshot(path="/tmp/a1111_refused.png")
        if args.forge:  # and after a generation has loaded the model
            report["tab: train after a generation (must refuse)"] = train_in_tab(page, "forge_tab", args.pid)
        browser.close()
    report["server alive afterwards"] = "state" in api("/sdapi/v1/progress")


if __name__ == "__main__":
    main()
