"""The SFT task: conversation data (any format component/data/formats.py reads), padded or padding-free
batches, our FinetuneTrainer."""

from __future__ import annotations

from loguru import logger
from transformers import TrainingArguments

from component.config import Config
from component.config.checks import choice_problems
from component.data.cache import cache_root, cached
from component.data.collator import PaddingCollator, PaddingFreeCollator
from component.data.sft import DataSummary, SFTData, build_sft_mixture
from component.data.splits import TaskData, build_mixed_splits
from component.data.supervision import REASONING_HISTORY, train_on_problems
from component.data.tokenizer_template import (
    check_template_keys,
    pad_eos_note,
    resolve_template,
    use_chat_template_file,
)
from component.errors import ConfigError
from component.model.attention import padding_free_enabled, padding_free_problem
from component.model.loading import read_model_type
from component.model.model_types import model_type_info
from component.tasks.task import Task
from component.training.trainer import build_finetune_trainer


def build_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    use_chat_template_file(tokenizer, config.data.chat_template)
    # Named or the tokenizer's own ('auto', or no template_name); refused where tokens are missing.
    template = resolve_template(config.data.template_name, tokenizer, config.model.model_name_or_path)
    build_args = dict(
        template=template,
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        num_workers=config.data.tokenize_num_workers,
        skip_invalid=config.data.skip_invalid_examples,
        empty_think=config.data.empty_think_block,
        reasoning_history=config.data.reasoning_history,
    )
    build = cached(build_sft_mixture, cache_root(config), "sft", SFTData, DataSummary.from_dict)
    with args.main_process_first(desc="sft data"):  # under torchrun the first rank builds the cache
        train, eval_ds = build_mixed_splits(config, build, **build_args)
    note = pad_eos_note(template, tokenizer, train.dataset[0]["labels"])
    if note:
        logger.log(note[0].upper(), note[1])
    return TaskData(train.dataset, eval_ds, choose_collator(config, tokenizer), train.summary, train.problems)


def choose_collator(config: Config, tokenizer):
    """Padding-free batches where the model type is verified for them, right padding otherwise."""
    model_type = read_model_type(config.model)
    problem = padding_free_problem(config.data.padding_free, model_type)
    if problem:
        raise ConfigError(problem)
    enabled = padding_free_enabled(config.data.padding_free, model_type_info(model_type))
    if config.data.batching == "tokens" and not enabled:
        raise ConfigError(
            f"key 'batching': 'tokens' packs each micro-batch into one padding-free row, which model type "
            f"{model_type!r} does not take here (padding_free is off, or the type is recurrent or not verified "
            "for it: a scan would carry state across examples); use batching 'examples'"
        )
    if enabled:
        logger.info(f"padding-free batches for model type {model_type!r}")
        return PaddingFreeCollator()
    return PaddingCollator(tokenizer.pad_token_id)


BATCHING = ("examples", "tokens")


def check_sft_values(values: dict) -> list[str]:
    """The SFT keys of what is learned: the template keys and each dataset's train_on."""
    problems = check_template_keys(values)
    problems += choice_problems("reasoning_history", values.get("reasoning_history", "whole"), REASONING_HISTORY)
    problems += choice_problems("batching", values.get("batching", "examples"), BATCHING)
    budget, longest = values.get("max_tokens_per_batch"), values.get("max_seq_length", 1024)
    if values.get("batching") == "tokens" and not (isinstance(budget, int) and budget >= longest):
        problems.append(
            f"key 'max_tokens_per_batch': batching 'tokens' needs a budget of at least max_seq_length ({longest}) "
            f"tokens, so that every example fits whole; got {budget!r}"
        )
    for key in ("datasets", "eval_datasets"):
        for i, entry in enumerate(values.get(key) or []):
            if isinstance(entry, dict) and entry.get("train_on") is not None:
                problems += train_on_problems(entry["train_on"], f"{key}[{i}].train_on")
    return problems


TASK = Task("sft", build_data, build_finetune_trainer, checks=(check_sft_values,), token_batches=True)
