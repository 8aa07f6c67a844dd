#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite on the CPU.
# Extra arguments go to pytest, e.g. `bash script/test.sh -m slow` or `bash script/test.sh tests/test_config.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash script/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ $# -eq 0 ]; then set -- -m "not slow and not gpu"; fi
exec .venv/bin/python -m pytest "$@"
