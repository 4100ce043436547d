#!/usr/bin/env bash
# The core under the WebUIs' own pins: a venv per host with the versions its requirements_versions.txt pins
# (A1111 1.10.1: transformers 4.30.2, safetensors 0.4.2, no diffusers, so the newest diffusers those allow;
# Forge: transformers 4.46.1, diffusers 0.31.0, huggingface-hub 0.26.2, safetensors 0.4.2), CPU torch 2.13.0 in
# place of the hosts' CUDA builds, the project installed without dependencies, and the core's tests.
# Usage: bench/host_pins.sh [a1111|forge] (default: both). Needs PyPI; takes a few minutes per host.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tests="tests/test_model.py tests/test_tokenizer.py tests/test_patch.py tests/test_injection.py tests/test_denoiser.py
       tests/test_engine.py"
declare -A pins=(
  [a1111]='transformers==4.30.2 safetensors==0.4.2 huggingface_hub<1.0 diffusers numpy==1.26.2'
  [forge]='transformers==4.46.1 safetensors==0.4.2 huggingface-hub==0.26.2 diffusers==0.31.0 numpy==1.26.2'
)
for host in "${@:-a1111 forge}"; do
  for h in $host; do
    venv=$(mktemp -d)/venv
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q torch==2.13.0 ${pins[$h]} pillow tqdm pytest
    "$venv/bin/pip" install -q --no-deps -e "$root"
    echo "== $h: $("$venv/bin/python" -c 'import transformers, diffusers, safetensors, huggingface_hub as h
print("transformers", transformers.__version__, "diffusers", diffusers.__version__, "safetensors",
      safetensors.__version__, "huggingface_hub", h.__version__)')"
    # shellcheck disable=SC2086
    (cd "$root" && "$venv/bin/python" -m pytest -q -p no:cacheprovider $tests)
  done
done
