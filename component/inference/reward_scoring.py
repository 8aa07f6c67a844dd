"""Scoring preference pairs with a trained reward model (task_type rm): accuracy and margin.

`script/evaluate.py --model RUN --pairs_file PAIRS.jsonl` reads the pairs in DPO's forms, checked,
rendered with the run's template and cut exactly as in training (component/data/preference.py),
scores both sides of each pair, and reports the share of pairs whose chosen reply gets the higher
reward (`accuracy`, what trl logs as `eval_accuracy`) and the mean difference (`mean_margin`).

The model is loaded as it was trained: a full run is a sequence classifier saved whole; an adapter
run is the base (GGUF or 4-bit alike) put under the classifier head by the training code itself
(component/tasks/reward.py), then the adapter and its head applied.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, TextIO

import torch
from torch.nn.utils.rnn import pad_sequence

from component.config import RESOLVED_CONFIG_NAME
from component.data.preference import build_preference_dataset
from component.inference.generation import (
    InferenceError,
    LoadedModel,
    ModelSource,
    adapter_base_model,
    inference_device,
    is_adapter_dir,
    load_base,
    load_tokenizer_from,
    parse_dtype,
    resolve_template,
)
from component.training.outputs import read_meta

REWARD_TASK = "rm"
DEFAULT_MAX_SEQ_LENGTH = 1024
DEFAULT_MAX_PROMPT_LENGTH = 512


@dataclass
class PairScores:
    pairs: int
    accuracy: float
    mean_margin: float
    mean_chosen_reward: float
    mean_rejected_reward: float


def _sequence_classifier(model_dir: str, dtype: torch.dtype):
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise InferenceError(f"cannot load reward model {model_dir!r}: {exc}") from None
    if model.config.num_labels != 1:
        raise InferenceError(f"{model_dir}: not a reward model (a classifier with {model.config.num_labels} outputs)")
    return model


def load_reward_model(source: ModelSource) -> LoadedModel:
    """A run of task_type rm: its folder (full), or its adapter with the base it names."""
    from peft import PeftModel

    from component.model.loading import fit_embeddings
    from component.tasks.reward import reward_model

    model_dir, adapter_dir = source.model, source.adapter
    if adapter_dir is None and is_adapter_dir(model_dir):
        adapter_dir, model_dir = model_dir, None
    task = (
        (read_meta(adapter_dir or model_dir) or {}).get("task_type")
        if Path(adapter_dir or model_dir).is_dir()
        else None
    )
    if task not in (None, REWARD_TASK):
        raise InferenceError(
            f"{adapter_dir or model_dir}: trained with task_type {task!r}, not a reward model ({REWARD_TASK!r})"
        )
    tokenizer = load_tokenizer_from(adapter_dir, model_dir)
    template = resolve_template(source.template, tokenizer, adapter_dir, model_dir)
    if adapter_dir is None:
        model = _sequence_classifier(model_dir, parse_dtype(source.dtype)).to(inference_device())
    else:
        model_dir = model_dir or adapter_base_model(adapter_dir)
        base = load_base(model_dir, parse_dtype(source.dtype), source.load_in_4bit)
        fit_embeddings(base, tokenizer)
        model = PeftModel.from_pretrained(reward_model(base), adapter_dir)
    # As in training (trl's RewardTrainer): the reward is read at the last token that is not padding.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model, tokenizer, template, f"{model_dir} + {adapter_dir}" if adapter_dir else model_dir)


def run_lengths(source: ModelSource, max_seq_length: Optional[int]) -> tuple[int, int]:
    """max_seq_length and max_prompt_length: given, else the run's (its train_args.json), else the defaults."""
    saved: dict = {}
    for d in (source.adapter, source.model):
        path = Path(d) / RESOLVED_CONFIG_NAME if d else None
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            break
    max_len = max_seq_length or saved.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH
    return max_len, min(saved.get("max_prompt_length") or DEFAULT_MAX_PROMPT_LENGTH, max_len - 1)


def rewards(model, sequences: Sequence[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
    """One reward per sequence, in batches right-padded as in training."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(sequences), batch_size):
        ids = [torch.tensor(s) for s in sequences[i : i + batch_size]]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id).to(device)
        mask = pad_sequence([torch.ones_like(s) for s in ids], batch_first=True, padding_value=0).to(device)
        with torch.no_grad():
            out.append(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu())
    return torch.cat(out)


def score_pairs(loaded: LoadedModel, pairs_file: str, max_len: int, max_prompt_len: int, batch_size: int) -> PairScores:
    data = build_preference_dataset(pairs_file, loaded.template, loaded.tokenizer, max_len, max_prompt_len).dataset
    pad = loaded.tokenizer.pad_token_id
    chosen = rewards(
        loaded.model, [p + c for p, c in zip(data["prompt_ids"], data["chosen_ids"], strict=True)], pad, batch_size
    )
    rejected = rewards(
        loaded.model, [p + r for p, r in zip(data["prompt_ids"], data["rejected_ids"], strict=True)], pad, batch_size
    )
    return PairScores(
        pairs=len(chosen),
        accuracy=(chosen > rejected).float().mean().item(),
        mean_margin=(chosen - rejected).mean().item(),
        mean_chosen_reward=chosen.mean().item(),
        mean_rejected_reward=rejected.mean().item(),
    )


def score_and_report(
    source: ModelSource,
    pairs_file: str,
    batch_size: int,
    max_seq_length: Optional[int] = None,
    output_json: Optional[str] = None,
    out: Optional[TextIO] = None,
) -> PairScores:
    """Score the pairs, then write the metrics as JSON to `out` (and to `output_json`)."""
    loaded = load_reward_model(source)
    max_len, max_prompt_len = run_lengths(source, max_seq_length)
    scores = score_pairs(loaded, pairs_file, max_len, max_prompt_len, batch_size)
    text = json.dumps({"model": loaded.name, "pairs_file": pairs_file, **asdict(scores)}, indent=2)
    if output_json:
        Path(output_json).write_text(text + "\n")
    (out or sys.stdout).write(text + "\n")
    return scores
