"""Evaluating a trained model on an SFT-format file: loss, perplexity, and replies.

Loss is the mean cross-entropy over the supervised tokens (the assistant replies
and their end-of-turn tokens), tokenized, masked and truncated by the very
functions training uses (component/data/sft.py), with the run's saved
template. Perplexity is exp(loss).

The file may be in any SFT format (component/data/formats.py, detected per
file), tool calls and reasoning included where the template renders them.

Replies (`generate_to`): each conversation's last reply is generated again and
one JSON line per conversation is written: the prompt messages, the reply, and
the reference reply when the file has one. A line that ends with a prompt (a
conversation turn with no "assistant", a last user or tool message, an Alpaca
record with no "output", a prompt with no "completion") is answered but has no
loss. GAIR's LIMA format is read too (component/data/lima.py), so LIMA's test
prompts work as they are.

Benchmarks (`tasks`): lm-evaluation-harness tasks, built-in or local YAML,
through component/inference/benchmarks.py, which imports lm-eval only then.
Samples (`eval_prompts`): a greedy and a seeded reply to each prompt, written
to samples.md by component/inference/samples.py. With a `baseline`, the base
model is scored on the same tasks and prompts after the fine-tuned one (one
model in memory at a time), with the run's tokenizer and template, so both see
the same tokens; eval_results.json gets both and the deltas, eval.png a bar
chart, and the run's report.json a copy under "benchmarks". Task names, local
task data and prompts are checked before any model loads.
"""

from __future__ import annotations

import gc
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, TextIO, Union

import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm
from transformers import GenerationConfig

from component.config import AUTO_DATA_FORMAT
from component.data.collator import PaddingCollator
from component.data.jsonl import raise_problems, read_jsonl
from component.data.lima import GAIR_KEY, from_gair
from component.data.prompts import prompt_line_checker
from component.data.sft import tokenized_example
from component.data.template import IGNORE_INDEX, Message, encode, render, stop_token_ids
from component.errors import DataError, UserError
from component.inference import benchmarks as bm
from component.inference import samples as smp
from component.inference.generation import (
    LoadedModel,
    ModelSource,
    adapter_base_model,
    inference_device,
    is_adapter_dir,
    load_base,
    parse_dtype,
)
from component.model.model_types import model_type_info
from component.training.outputs import read_meta
from component.training.report import REPORT_FILE, write_json

DEFAULT_MAX_SEQ_LENGTH = 1024
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 256
REPORT_KEY = "benchmarks"  # where eval_results.json is copied into the run's report.json


# ---------------------------------------------------------------- reading


@dataclass
class EvalRecord:
    """One conversation, the system prompt first; `has_reply` is False when it ends with a prompt to answer."""

    messages: list[Message]
    tools: Optional[list]
    has_reply: bool


def eval_line_checker(data_format: str = AUTO_DATA_FORMAT, template=None, tokenizer=None):
    """Checks one line of an eval file: any SFT format (detected per file), where the last turn may
    be a prompt with no reply, or GAIR's format. With the template and tokenizer, a line with tool
    calls or reasoning is rendered too, so that a template that cannot names the line."""
    lines = prompt_line_checker(data_format, template, tokenizer)

    def check(obj: Any) -> Union[EvalRecord, str]:
        gair = isinstance(obj, dict) and isinstance(obj.get(GAIR_KEY), list) and "conversation" not in obj
        if gair and not any(isinstance(turn, dict) for turn in obj[GAIR_KEY]):  # ShareGPT turns are objects
            obj = from_gair(obj)
            if isinstance(obj, str):
                return obj
        line = lines(obj)
        if isinstance(line, str):
            return line
        replied = line.reply is not None
        return EvalRecord(line.messages + [line.reply] if replied else line.messages, line.tools, replied)

    return check


def read_eval_file(path: str, template=None, tokenizer=None) -> list[EvalRecord]:
    result = read_jsonl(path, eval_line_checker(AUTO_DATA_FORMAT, template, tokenizer))
    raise_problems(path, result.problems)
    if not result.records:
        raise DataError(f"{path}: no conversations")
    return result.records


# ---------------------------------------------------------------- loss


@dataclass
class LossResult:
    examples: int
    dropped_no_supervised: int
    truncated: int
    supervised_tokens: int
    loss: Optional[float]
    perplexity: Optional[float]


def tokenize_for_loss(records: Sequence[EvalRecord], loaded: LoadedModel, max_len: int) -> tuple[list[dict], int]:
    """Tokenized examples, as training tokenizes them, and how many were truncated."""
    examples, truncated = [], 0
    for r in records:
        if r.has_reply:
            rendered = render(loaded.template, loaded.tokenizer, r.messages, tools=r.tools)
            row = tokenized_example(encode(loaded.tokenizer, rendered), max_len)
            truncated += row["truncated"]
            examples.append(row)
    return examples, truncated


def summed_nll(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Sum of next-token NLL over supervised positions, and their count (as the training loss shifts)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll.item(), int((targets != IGNORE_INDEX).sum())


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def evaluate_loss(records: Sequence[EvalRecord], loaded: LoadedModel, max_len: int, batch_size: int) -> LossResult:
    examples, truncated = tokenize_for_loss(records, loaded, max_len)
    kept = [e for e in examples if e["num_supervised"] > 0]
    # Longest first: batches of similar length waste less padding, and memory trouble shows at once.
    kept.sort(key=lambda e: len(e["input_ids"]), reverse=True)
    collate = PaddingCollator(loaded.tokenizer.pad_token_id)
    device = next(loaded.model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for group in tqdm(list(batches(kept, batch_size)), desc="Loss", unit="batch", disable=not kept):
            batch = {k: v.to(device) for k, v in collate(list(group)).items()}
            nll, n = summed_nll(loaded.model, batch)
            total, count = total + nll, count + n
    loss = total / count if count else None
    return LossResult(
        examples=len(kept),
        dropped_no_supervised=len(examples) - len(kept),
        truncated=truncated,
        supervised_tokens=count,
        loss=loss,
        perplexity=math.exp(loss) if loss is not None else None,
    )


# ---------------------------------------------------------------- generating


def prompt_messages(record: EvalRecord) -> list[Message]:
    """The conversation up to its last reply (or all of it, when it ends with a prompt)."""
    return record.messages[:-1] if record.has_reply else record.messages


def cut_reply(tokenizer, ids: list[int], stop_ids: set[int], stop_text: str) -> str:
    for i, tok in enumerate(ids):
        if tok in stop_ids:
            ids = ids[:i]
            break
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return text.split(stop_text)[0] if stop_text else text


def generate_replies(
    prompts: Sequence[tuple[list[Message], Optional[list]]],
    loaded: LoadedModel,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> Iterator[str]:
    """Replies in prompt order, generated in left-padded batches (one at a time for recurrent models)."""
    tok, model = loaded.tokenizer, loaded.model
    if model_type_info(model.config.model_type).recurrent:
        batch_size = 1  # padding would flow through a recurrent state
    stop_ids = stop_token_ids(loaded.template, tok)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=None,
        eos_token_id=stop_ids or None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0],
    )
    device = next(model.parameters()).device
    texts = [render(loaded.template, tok, p, add_generation_prompt=True, tools=tools).text for p, tools in prompts]
    for group in tqdm(list(batches(texts, batch_size)), desc="Generate", unit="batch"):
        enc = tok(list(group), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc.to(device), generation_config=config)
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            yield cut_reply(tok, row, set(stop_ids), loaded.template.stop_text(tok))


def write_generations(path: str, records: Sequence[EvalRecord], replies: Iterator[str]) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        # replies first: zip then drains the generator, which closes its progress bar.
        for i, (reply, record) in enumerate(zip(replies, records, strict=True)):
            messages = prompt_messages(record)
            line = {
                "index": i,
                "messages": [m.to_dict() for m in messages],
                "prompt": messages[-1].content,
                "reply": reply,
                "reference": record.messages[-1].content if record.has_reply else None,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()  # a long run can be watched, and an interrupted one keeps its lines
            written += 1
    return written


# ---------------------------------------------------------------- the command (script/evaluate.py)


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate on and how; the model comes apart, as a ModelSource."""

    eval_file: Optional[str] = None
    """SFT-format JSONL (the last turn may omit "assistant"), or GAIR's format: loss and perplexity."""
    generate_to: Optional[str] = None
    """Write one JSON line per conversation here: prompt and reply."""
    batch_size: int = DEFAULT_BATCH_SIZE
    max_seq_length: Optional[int] = None
    """None: the run's max_seq_length, else DEFAULT_MAX_SEQ_LENGTH."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    """0 is greedy."""
    top_p: float = 1.0
    output_json: Optional[str] = None
    """Also write the metrics to this file."""
    tasks: tuple[str, ...] = ()
    """lm-eval tasks, groups or tags (mmlu, gsm8k, ...), or local tasks (data/eval_tasks/, `task_dirs`)."""
    task_dirs: tuple[str, ...] = ()
    """More folders of local lm-eval YAML tasks, searched before data/eval_tasks/."""
    limit: Optional[float] = None
    """At most this many documents per task (a fraction of each task when below 1)."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per prompt, as earlier turns; None: each task's own default."""
    baseline: Optional[str] = None
    """A base model to score on the same tasks and prompts; samples default to the run's recorded base."""
    eval_prompts: Optional[str] = None
    """Prompts (any SFT format, the last turn a prompt) for samples.md."""
    output_dir: Optional[str] = None
    """Where eval_results.json, eval.png and samples.md go; None: the run's folder."""
    sample_settings: smp.SampleSettings = smp.SampleSettings()
    """How the samples are generated (max_new_tokens is this command's --max_new_tokens)."""


def check_settings(settings: EvalSettings) -> None:
    problems = [
        f"--{name} must be at least 1, got {getattr(settings, name)}"
        for name in ("batch_size", "max_new_tokens")
        if getattr(settings, name) < 1
    ]
    if settings.max_seq_length is not None and settings.max_seq_length < 2:
        problems.append(f"--max_seq_length must be at least 2, got {settings.max_seq_length}")
    if settings.temperature < 0 or not 0 < settings.top_p <= 1:
        problems.append("--temperature must be >= 0 and --top_p in (0, 1]")
    if not (settings.eval_file or settings.tasks or settings.eval_prompts):
        problems.append("nothing to evaluate: give --eval_file, --tasks or --eval_prompts")
    if settings.limit is not None and settings.limit <= 0:
        problems.append(f"--limit must be above 0, got {settings.limit}")
    if settings.num_fewshot is not None and settings.num_fewshot < 0:
        problems.append(f"--num_fewshot must be at least 0, got {settings.num_fewshot}")
    if settings.baseline and not (settings.tasks or settings.eval_prompts):
        problems.append("--baseline needs --tasks or --eval_prompts to compare on")
    if problems:
        raise UserError("; ".join(problems))


def run_max_seq_length(source: ModelSource, max_seq_length: Optional[int]) -> int:
    """The given length, else the one the run trained with (adapter first), else the default."""
    if max_seq_length:
        return max_seq_length
    for d in (source.adapter, source.model):
        saved = (read_meta(d) or {}).get("max_seq_length") if d and Path(d).is_dir() else None
        if saved:
            return int(saved)
    return DEFAULT_MAX_SEQ_LENGTH


def evaluate_file(
    records: Sequence[EvalRecord], loaded: LoadedModel, source: ModelSource, settings: EvalSettings
) -> dict:
    """Loss and perplexity on the eval file (`records`, read from it), and the replies when asked for."""
    rich = any(r.tools or not all(m.plain for m in r.messages) for r in records)
    if rich and settings.eval_file:  # tools, reasoning: can the template render them?
        records = read_eval_file(settings.eval_file, loaded.template, loaded.tokenizer)
    max_len = run_max_seq_length(source, settings.max_seq_length)
    logger.info(
        f"{loaded.name}: template {loaded.template.name}, max_seq_length {max_len}, "
        f"{len(records)} conversations in {settings.eval_file}"
    )
    metrics: dict[str, Any] = {"model": loaded.name, "eval_file": settings.eval_file, "max_seq_length": max_len}
    metrics.update(asdict(evaluate_loss(records, loaded, max_len, settings.batch_size)))
    if metrics["loss"] is None:
        logger.warning("no conversation with a supervised reply: no loss to report")
    if settings.generate_to:
        prompts = [(prompt_messages(r), r.tools) for r in records]
        replies = generate_replies(
            prompts, loaded, settings.batch_size, settings.max_new_tokens, settings.temperature, settings.top_p
        )
        metrics["generated"] = write_generations(settings.generate_to, records, replies)
        logger.info(f"wrote {metrics['generated']} replies to {settings.generate_to}")
    return metrics


# ---------------------------------------------------------------- benchmarks, samples, before and after


def run_folder(source: ModelSource) -> Optional[str]:
    """The training run being evaluated (the adapter's folder, or a full or merged model's), if any."""
    for d in (source.adapter, source.model):
        if d and Path(d).is_dir() and read_meta(d) is not None:
            return d
    return None


def results_dir(source: ModelSource, settings: EvalSettings) -> Path:
    if settings.output_dir:
        return Path(settings.output_dir)
    run = run_folder(source)
    if run is None:
        raise UserError(
            f"{source.model} is not a training run's folder (no training_meta.json): give --output_dir for "
            f"{bm.RESULTS_FILE}, {bm.PLOT_FILE} and {smp.SAMPLES_FILE}"
        )
    return Path(run)


def recorded_base(source: ModelSource) -> Optional[str]:
    """The base model a run was trained from (an adapter's, or a merged model's recorded base)."""
    adapter = source.adapter or (source.model if is_adapter_dir(source.model) else None)
    if adapter:
        return source.model if source.adapter and source.model else adapter_base_model(adapter)
    run = run_folder(source)
    return (read_meta(run) or {}).get("base_model") if run else None


def read_prompts(path: str) -> list[list[Message]]:
    """The prompts of a file in any SFT format: each conversation up to its last reply (or whole)."""
    return [prompt_messages(r) for r in read_eval_file(path)]


def load_baseline(model: str, like: LoadedModel, source: ModelSource) -> LoadedModel:
    """The base model with the fine-tuned run's tokenizer and template: the same prompts, the same tokens."""
    from component.model.loading import fit_embeddings

    base = load_base(model, parse_dtype(source.dtype), source.load_in_4bit)
    fit_embeddings(base, like.tokenizer)  # tokens the run added get rows, as in load_for_inference
    return LoadedModel(base.eval(), like.tokenizer, like.template, model)


@dataclass
class Scores:
    """What one model gave: benchmark scores and generation samples (either may be absent)."""

    benchmarks: Optional[bm.BenchmarkRun] = None
    samples: Optional[smp.ModelSamples] = None


def score(loaded: LoadedModel, plan: Optional[bm.TaskPlan], prompts, settings: EvalSettings) -> Scores:
    benchmarks = (
        bm.run_benchmarks(loaded, plan, settings.limit, settings.num_fewshot, settings.batch_size) if plan else None
    )
    samples = smp.model_samples(loaded, prompts, sample_settings(settings)) if prompts else None
    return Scores(benchmarks, samples)


def sample_settings(settings: EvalSettings) -> smp.SampleSettings:
    return replace(settings.sample_settings, max_new_tokens=settings.max_new_tokens)


def free(loaded: LoadedModel) -> None:
    """Let the fine-tuned model go before the baseline loads: one model in memory at a time."""
    loaded.model = None
    gc.collect()
    if inference_device().type == "cuda":
        torch.cuda.empty_cache()


def write_comparison(
    out: Path, tuned: bm.BenchmarkRun, base: Optional[bm.BenchmarkRun], settings: EvalSettings
) -> dict:
    """eval_results.json, eval.png, and the run's report.json under "benchmarks"; returns the results."""
    results = bm.comparison(
        tuned, base, tasks=list(settings.tasks), limit=settings.limit, num_fewshot=settings.num_fewshot
    )
    bm.write_results(results, out / bm.RESULTS_FILE)
    bm.plot_comparison(tuned, base, out / bm.PLOT_FILE)
    logger.info(f"lm-eval scores ({out / bm.RESULTS_FILE}, {out / bm.PLOT_FILE}):\n{bm.delta_table(tuned, base)}")
    report = out / REPORT_FILE
    if report.is_file():
        write_json(report, {**json.loads(report.read_text()), REPORT_KEY: results})
        logger.info(f"added the scores to {report} under {REPORT_KEY!r}")
    return results


def evaluate(source: ModelSource, settings: EvalSettings) -> dict[str, Any]:
    """The metrics; tasks, data and prompts are read and checked before any model is loaded."""
    check_settings(settings)
    plan = bm.plan_tasks(settings.tasks, settings.task_dirs) if settings.tasks else None
    records = read_eval_file(settings.eval_file) if settings.eval_file else None
    prompts = read_prompts(settings.eval_prompts) if settings.eval_prompts else None
    out = results_dir(source, settings) if plan or prompts else None
    base_model = settings.baseline or (recorded_base(source) if prompts else None)
    loaded = source.load()
    metrics: dict[str, Any] = evaluate_file(records, loaded, source, settings) if records else {"model": loaded.name}
    tuned = score(loaded, plan, prompts, settings)
    base = Scores()
    if base_model:  # --baseline, or the run's recorded base for the samples
        free(loaded)
        base = score(load_baseline(base_model, loaded, source), plan if settings.baseline else None, prompts, settings)
    if out and tuned.benchmarks:
        metrics["benchmarks"] = write_comparison(out, tuned.benchmarks, base.benchmarks, settings)
    if out and prompts and tuned.samples:
        markdown = smp.samples_markdown(
            prompts, tuned.samples, base.samples, sample_settings(settings), loaded.template.name
        )
        metrics["samples"] = str(smp.write_samples(out / smp.SAMPLES_FILE, markdown))
    return metrics


def evaluate_and_report(source: ModelSource, settings: EvalSettings, out: Optional[TextIO] = None) -> None:
    """Evaluate, then write the metrics as JSON to `out` (and to `settings.output_json`)."""
    text = json.dumps(evaluate(source, settings), indent=2)
    if settings.output_json:
        Path(settings.output_json).write_text(text + "\n")
    (out or sys.stdout).write(text + "\n")
