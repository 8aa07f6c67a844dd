"""Evaluate a trained model: loss and perplexity on a file, lm-eval benchmarks, generation samples.

    python script/evaluate.py --model DIR [--adapter DIR] --eval_file FILE.jsonl
        [--generate_to OUT.jsonl] [--batch_size 8] [--max_seq_length N] [--max_new_tokens 256]
    python script/evaluate.py --model RUN --tasks ft_facts_mc,ft_facts_gen,mmlu [--limit N]
        [--num_fewshot K] [--baseline BASE_MODEL] [--eval_prompts PROMPTS.jsonl] [--output_dir DIR]

Loss is the mean cross-entropy over the supervised tokens, tokenized, masked
and truncated as in training, with the run's saved template; perplexity is
exp(loss). With --generate_to, each conversation's last user message is
answered, one JSON line per conversation (a last turn without "assistant" is
a prompt only). GAIR's LIMA format is read too. Greedy unless --temperature.

--tasks scores lm-evaluation-harness tasks (pip install lm-eval==0.4.13) with
the run's chat template; --baseline scores a base model on the same tasks and
prompts, for the deltas. --eval_prompts writes samples.md: a greedy and a
seeded reply per prompt, base beside fine-tuned. eval_results.json, eval.png
and samples.md go to --output_dir (default: the run's folder, whose
report.json gets the scores too). The metrics are printed as JSON (and
written to --output_json).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_model_arguments, model_source, run_main
from component.inference import benchmarks as bm
from component.inference import evaluation as ev
from component.inference.samples import SampleSettings


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--eval_file", help="SFT-format JSONL for loss and perplexity (last turn may omit 'assistant')")
    p.add_argument("--generate_to", help="write one JSON line per conversation: prompt and reply")
    p.add_argument("--batch_size", type=int, default=ev.DEFAULT_BATCH_SIZE)
    p.add_argument("--max_seq_length", type=int, help="default: the run's max_seq_length, else 1024")
    p.add_argument("--max_new_tokens", type=int, default=ev.DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--output_json", help="also write the metrics to this file")
    p.add_argument(
        "--pairs_file",
        help="a reward model (task_type rm): score these preference pairs (DPO's forms) for accuracy and mean margin",
    )
    p.add_argument(
        "--tasks",
        help="lm-eval tasks, comma-separated: built-in (mmlu, gsm8k, ...) or local (data/eval_tasks/: "
        "ft_facts_mc, ft_facts_gen); needs lm-eval",
    )
    p.add_argument("--task_dir", action="append", default=[], help="a folder of local lm-eval YAML tasks (repeatable)")
    p.add_argument("--limit", type=float, help="at most N documents per task (a fraction of each when below 1)")
    p.add_argument("--num_fewshot", type=int, help="few-shot examples per prompt; default: each task's own")
    p.add_argument("--baseline", help="base model to score on the same tasks and prompts, for the deltas")
    p.add_argument("--eval_prompts", help="prompts (any SFT format) for samples.md: base and fine-tuned side by side")
    p.add_argument("--seed", type=int, default=0, help="seed set before each sampled reply of samples.md")
    p.add_argument(
        "--output_dir", help="where eval_results.json, eval.png and samples.md go; default: the run's folder"
    )
    return p.parse_args(argv)


def settings(a: argparse.Namespace) -> ev.EvalSettings:
    return ev.EvalSettings(
        eval_file=a.eval_file,
        generate_to=a.generate_to,
        batch_size=a.batch_size,
        max_seq_length=a.max_seq_length,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        output_json=a.output_json,
        tasks=tuple(bm.parse_task_names(a.tasks)) if a.tasks else (),
        task_dirs=tuple(a.task_dir),
        limit=int(a.limit) if a.limit is not None and a.limit >= 1 and a.limit.is_integer() else a.limit,
        num_fewshot=a.num_fewshot,
        baseline=a.baseline,
        eval_prompts=a.eval_prompts,
        output_dir=a.output_dir,
        sample_settings=SampleSettings(seed=a.seed),
    )


def score_pairs_file(a: argparse.Namespace) -> None:
    from component.inference.reward_scoring import score_and_report

    score_and_report(model_source(a), a.pairs_file, a.batch_size, a.max_seq_length, a.output_json)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.pairs_file:
        return run_main(lambda: score_pairs_file(args), verbose=args.verbose)
    return run_main(lambda: ev.evaluate_and_report(model_source(args), settings(args)), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
