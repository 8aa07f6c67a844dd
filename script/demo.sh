#!/usr/bin/env bash
# The README demo: set up, fine-tune SmolLM2-135M-Instruct with LoRA on the CPU
# on our sample conversations, merge the adapter, and ask the result a question.
#   bash script/demo.sh                 # the full demo (a few minutes on 2 cores)
#   DEMO_STEPS=3 bash script/demo.sh    # a smoke run (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
bash script/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python
CONFIG=train_args/smollm2-135m-sft-lora.json
OUT=output/smollm2-135m-sft-lora
steps=()
[ -n "${DEMO_STEPS:-}" ] && steps=(--max_steps "$DEMO_STEPS" --logging_steps 1 --save_steps "$DEMO_STEPS")

"$PY" train.py --train_args_file "$CONFIG" --output_dir "$OUT" --overwrite_output_dir true "${steps[@]}"
if [ -f script/merge_lora.py ] && [ -f script/chat.py ]; then
  "$PY" script/merge_lora.py --adapter_dir "$OUT" --output_dir "$OUT-merged" --force
  "$PY" script/chat.py --model "$OUT-merged" --prompt "Give me three tips for writing clear emails." --max_new_tokens 64
fi
# The full demo also scores base against fine-tuned on the local exact-match set and writes samples.md
# (a few minutes on 2 cores); the CI smoke run (DEMO_STEPS) skips it.
if [ -z "${DEMO_STEPS:-}" ]; then
  "$PY" script/evaluate.py --model "$OUT" --tasks ft_facts_gen --baseline models/SmolLM2-135M-Instruct.gguf \
    --eval_prompts data/eval_tasks/prompts.jsonl --max_new_tokens 64 --output_json "$OUT/eval_summary.json" > /dev/null
  echo "[demo] base vs fine-tuned: $OUT/eval_results.json, $OUT/eval.png; replies side by side: $OUT/samples.md"
fi
