"""The ORPO task: preference pairs trained with trl's ORPOTrainer (trl.experimental.orpo in trl 1.16).

ORPO needs no reference model: its loss is the chosen reply's NLL minus `orpo_beta` (the
paper's λ) times log σ(log-odds ratio of chosen over rejected). The pairs are DPO's
(component/data/preference.py: checked per line, rendered with our templates, tokenized as SFT
does, cut in one place); they reach trl as its own tokenized columns (`chosen_input_ids`,
`chosen_labels`, ...), so trl never re-tokenizes them or appends an EOS our template does not
use. trl's NLL term runs over the chosen prompt and reply (the paper's code does the same);
the odds ratio over the replies only.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainingArguments

from component.config import Config
from component.data.preference import mapped
from component.data.splits import TaskData
from component.data.template import IGNORE_INDEX
from component.data.tokenizer_template import check_template_keys
from component.tasks import dpo
from component.tasks.task import Task
from component.training.setup import training_arguments
from component.training.trainer import RunHooks

SIDES = ("chosen", "rejected")
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def orpo_row(row: dict) -> dict[str, list[int]]:
    """A pair as trl's ORPO tokenizer leaves it: each side the prompt and its reply, labels on the reply."""
    prompt = row["prompt_ids"]
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in SIDES:
        reply = row[f"{side}_ids"]
        out[f"{side}_input_ids"] = prompt + reply
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
    return out


def orpo_columns(dataset):
    return mapped(dataset, orpo_row, remove_columns=list(PAIR_COLUMNS))


def build_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    data = dpo.build_data(config, args, tokenizer)  # the same pairs, the same cache
    eval_ds = orpo_columns(data.eval) if data.eval is not None else None
    return data._replace(train=orpo_columns(data.train), eval=eval_ds)


def _orpo_module():
    return dpo.trl_experimental("orpo")


def orpo_arguments(config: Config):
    """trl's ORPOConfig: every TrainingArguments value of ours, plus ORPO's λ."""
    return training_arguments(
        config,
        _orpo_module().ORPOConfig,
        beta=config.method.orpo_beta,
        max_length=config.data.max_seq_length,  # pairs already fit: nothing is cut again
        dataset_num_proc=config.data.tokenize_num_workers,
        trust_remote_code=config.model.trust_remote_code,
    )


def counted(inputs: dict) -> dict[str, torch.Tensor]:
    """The batch as the run report counts it (component/training/report.py reads `attention_mask` and
    `completion_mask`): both sequences of each pair, and their reply tokens. trl reads neither key."""
    from trl.experimental.utils import pad_to_length

    length = max(inputs[f"{side}_input_ids"].shape[1] for side in SIDES)
    mask = [pad_to_length(inputs[f"{side}_attention_mask"], length, 0) for side in SIDES]
    replies = [pad_to_length((inputs[f"{side}_labels"] != IGNORE_INDEX).long(), length, 0) for side in SIDES]
    return {"attention_mask": torch.cat(mask), "completion_mask": torch.cat(replies)}


def _trainer_class():
    class ORPORunTrainer(RunHooks, _orpo_module().ORPOTrainer):
        """trl's ORPOTrainer on our tokenized pairs, with the run hooks."""

        def tokenize_row(self, feature, model=None):
            if "chosen_input_ids" in feature:  # ours (orpo_row): rendered with the template, already cut
                return {}
            return super().tokenize_row(feature, model)

        def training_step(self, model, inputs, *args, **kwargs):
            return super().training_step(model, {**inputs, **counted(inputs)}, *args, **kwargs)

    return ORPORunTrainer


def build_trainer(config: Config, args, model, tokenizer, data: TaskData, callbacks=()):
    # trl's constructor sends the ping, and maps the datasets three times, leaving ours as they are (tokenize_row).
    return dpo.trl_trainer(_trainer_class(), config, args, model, tokenizer, data, callbacks)


def check_orpo_values(values: dict[str, Any]) -> list[str]:
    problems = check_template_keys(values)
    beta = values.get("orpo_beta", 0.1)
    if not beta > 0:
        problems.append(
            f"key 'orpo_beta': must be positive (the weight of the odds-ratio term, 0.1 is usual), got {beta}"
        )
    return problems


TASK = Task("orpo", build_data, build_trainer, checks=(check_orpo_values,), training_arguments=orpo_arguments)
