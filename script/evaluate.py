"""Evaluate a trained model on an SFT-format file: loss, perplexity, and replies.

    python script/evaluate.py --model DIR [--adapter DIR] --eval_file FILE.jsonl
        [--generate_to OUT.jsonl] [--batch_size 8] [--max_seq_length N] [--max_new_tokens 256]

Loss is the mean cross-entropy over the supervised tokens (the assistant replies
and their end-of-turn tokens), tokenized, masked and truncated by the very
functions training uses (component/sft_data.py), with the run's saved
template. Perplexity is exp(loss).

With --generate_to, each conversation's last user message is answered and one
JSON line per conversation is written: the prompt messages, the reply, and the
reference reply when the file has one. A line whose last turn has no
"assistant" key is a prompt only: it is answered but has no loss. GAIR's LIMA
format (`{"conversations": [prompt, reply, ...]}`) is read too, so LIMA's test
prompts work as they are. Greedy decoding unless --temperature is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from loguru import logger  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from component.collator import PaddingCollator  # noqa: E402
from component.errors import USER_ERROR_EXIT_CODE, DataError, UserError  # noqa: E402
from component.inference import LoadedModel, load_for_inference  # noqa: E402
from component.jsonl import raise_problems, read_jsonl  # noqa: E402
from component.logs import setup_logging  # noqa: E402
from component.model_types import model_type_info  # noqa: E402
from component.outputs import read_meta  # noqa: E402
from component.sft_data import check_conversation, tokenize_conversation  # noqa: E402
from component.template import IGNORE_INDEX, Message, conversation_messages, generation_prompt, stop_token_ids  # noqa: E402

DEFAULT_MAX_SEQ_LENGTH = 1024
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 256
PROMPT_ONLY_PLACEHOLDER = "-"  # stands in for a missing last reply while a line is checked


# ---------------------------------------------------------------- reading


@dataclass
class EvalRecord:
    """One conversation; `has_reply` is False when its last turn is a prompt to answer."""

    conversation: list[dict]
    system: Optional[str]
    has_reply: bool


def from_gair(obj: dict) -> Union[dict, str]:
    """GAIR's LIMA format, {"conversations": [human, assistant, ...]}, as ours; an odd count ends in a prompt."""
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        return "'conversations' must be a non-empty list of strings (GAIR's format)"
    pairs = [turns[i : i + 2] for i in range(0, len(turns), 2)]
    return {"conversation": [{"human": p[0], **({"assistant": p[1]} if len(p) > 1 else {})} for p in pairs]}


def check_eval_line(obj: Any) -> Union[EvalRecord, str]:
    """Our SFT format, where the last turn may omit "assistant" (a prompt only), or GAIR's."""
    if isinstance(obj, dict) and "conversations" in obj and "conversation" not in obj:
        obj = from_gair(obj)
        if isinstance(obj, str):
            return obj
    conv = obj.get("conversation") if isinstance(obj, dict) else None
    prompt_only = isinstance(conv, list) and conv and isinstance(conv[-1], dict) and "assistant" not in conv[-1]
    if prompt_only:
        obj = {**obj, "conversation": [*conv[:-1], {**conv[-1], "assistant": PROMPT_ONLY_PLACEHOLDER}]}
    checked = check_conversation(obj)
    if isinstance(checked, str):
        return checked
    turns = list(checked["conversation"])
    if prompt_only:
        turns[-1] = {"human": turns[-1]["human"]}
    return EvalRecord(turns, checked["system"], not prompt_only)


def read_eval_file(path: str) -> list[EvalRecord]:
    result = read_jsonl(path, check_eval_line)
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
            row = tokenize_conversation(
                {"conversation": r.conversation, "system": r.system}, loaded.template, loaded.tokenizer, max_len
            )
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
    """The conversation up to its last user message."""
    turns = record.conversation
    messages = conversation_messages(turns[:-1], record.system)
    return [*messages, Message("user", turns[-1]["human"])]


def cut_reply(tokenizer, ids: list[int], stop_ids: set[int], stop_text: str) -> str:
    for i, tok in enumerate(ids):
        if tok in stop_ids:
            ids = ids[:i]
            break
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return text.split(stop_text)[0] if stop_text else text


def generate_replies(
    prompts: Sequence[list[Message]],
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
    texts = [generation_prompt(loaded.template, tok, p) for p in prompts]
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
                "messages": [{"role": m.role, "content": m.content} for m in messages],
                "prompt": messages[-1].content,
                "reply": reply,
                "reference": record.conversation[-1].get("assistant"),
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()  # a long run can be watched, and an interrupted one keeps its lines
            written += 1
    return written


# ---------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder, merged output, or a run's adapter folder")
    p.add_argument("--adapter", help="LoRA adapter folder to apply on --model")
    p.add_argument("--eval_file", required=True, help="SFT-format JSONL (last turn may omit 'assistant')")
    p.add_argument("--generate_to", help="write one JSON line per conversation: prompt and reply")
    p.add_argument("--template", help="chat template; default: the one the run saved")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--max_seq_length", type=int, help="default: the run's max_seq_length, else 1024")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--load_in_4bit", action="store_true", help="load the base model in 4 bits (GPU)")
    p.add_argument("--output_json", help="also write the metrics to this file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    problems = [
        f"--{name} must be at least 1, got {getattr(args, name)}"
        for name in ("batch_size", "max_new_tokens")
        if getattr(args, name) < 1
    ]
    if args.max_seq_length is not None and args.max_seq_length < 2:
        problems.append(f"--max_seq_length must be at least 2, got {args.max_seq_length}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        problems.append("--temperature must be >= 0 and --top_p in (0, 1]")
    if problems:
        raise UserError("; ".join(problems))


def run_max_seq_length(args: argparse.Namespace) -> int:
    if args.max_seq_length:
        return args.max_seq_length
    for d in (args.adapter, args.model):
        saved = (read_meta(d) or {}).get("max_seq_length") if d and Path(d).is_dir() else None
        if saved:
            return int(saved)
    return DEFAULT_MAX_SEQ_LENGTH


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    records = read_eval_file(args.eval_file)
    loaded = load_for_inference(args.model, args.adapter, args.template, args.dtype, args.load_in_4bit)
    max_len = run_max_seq_length(args)
    logger.info(
        f"{loaded.name}: template {loaded.template.name}, max_seq_length {max_len}, "
        f"{len(records)} conversations in {args.eval_file}"
    )
    metrics: dict[str, Any] = {"model": loaded.name, "eval_file": args.eval_file, "max_seq_length": max_len}
    metrics.update(asdict(evaluate_loss(records, loaded, max_len, args.batch_size)))
    if metrics["loss"] is None:
        logger.warning("no conversation with a supervised reply: no loss to report")
    if args.generate_to:
        prompts = [prompt_messages(r) for r in records]
        replies = generate_replies(prompts, loaded, args.batch_size, args.max_new_tokens, args.temperature, args.top_p)
        metrics["generated"] = write_generations(args.generate_to, records, replies)
        logger.info(f"wrote {metrics['generated']} replies to {args.generate_to}")
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        metrics = evaluate(args)
    except UserError as exc:
        logger.error(str(exc))
        return USER_ERROR_EXIT_CODE
    text = json.dumps(metrics, indent=2)
    if args.output_json:
        Path(args.output_json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
