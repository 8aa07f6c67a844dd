"""The reward-model task (`rm`): a one-output sequence classifier on the base, trained with trl's RewardTrainer.

Data are DPO's pairs (component/data/preference.py: checked per line, rendered with our templates,
tokenized as SFT does, cut in one place); each side reaches trl as one tokenized sequence, the
prompt and its reply (`chosen_ids`, `rejected_ids`), so trl never re-tokenizes it. The reward is
the score head's output at the last token that is not padding; the loss is -log σ(r_chosen -
r_rejected), and trl logs `accuracy` (the share of pairs ranked right) and `margin`, for the eval
file too (`eval_accuracy`); the last evaluation's also goes into report.json, under "reward_model".

The model: the runner loads the base as a causal LM, adapted for the train mode. `reward_model` puts
that decoder, the same weights (4-bit under QLoRA), under the score head that
AutoModelForSequenceClassification gives the architecture; under LoRA and QLoRA the adapter is
made again for the classifier (peft's SEQ_CLS task: the head trains in full and is saved with the
adapter). A run saves a sequence classifier (full) or its adapter, which
`AutoPeftModelForSequenceClassification` loads; `script/evaluate.py --pairs_file` scores pairs with it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from transformers import AutoModelForSequenceClassification, PreTrainedModel, TrainerCallback, TrainingArguments

from component.config import Config
from component.config.arguments import BASE_REWRITING_INITS
from component.data.preference import mapped
from component.data.splits import TaskData
from component.data.tokenizer_template import check_template_keys
from component.tasks import dpo
from component.tasks.task import Task
from component.training.report import REPORT_FILE, write_json
from component.training.setup import training_arguments
from component.training.trainer import RunHooks

REPORT_KEY = "reward_model"  # where report.json holds the last eval accuracy
EVAL_ACCURACY = "eval_accuracy"  # trl's RewardTrainer's names, with the Trainer's eval_ prefix
EVAL_KEYS = (EVAL_ACCURACY, "eval_margin", "eval_loss")


def sequence_row(row: dict) -> dict[str, list[int]]:
    """A pair as two whole sequences, each the prompt and one reply."""
    return {
        "chosen_ids": row["prompt_ids"] + row["chosen_ids"],
        "rejected_ids": row["prompt_ids"] + row["rejected_ids"],
    }


def sequence_columns(dataset):
    return mapped(dataset, sequence_row, remove_columns=["prompt_ids"])


def build_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    data = dpo.build_data(config, args, tokenizer)  # the same pairs, the same cache
    eval_ds = sequence_columns(data.eval) if data.eval is not None else None
    return data._replace(train=sequence_columns(data.train), eval=eval_ds)


def rm_arguments(config: Config):
    """trl's RewardConfig: every TrainingArguments value of ours, plus the reward options."""
    from trl import RewardConfig

    return training_arguments(
        config,
        RewardConfig,
        center_rewards_coefficient=config.method.rm_center_rewards_coefficient,
        max_length=config.data.max_seq_length,  # pairs already fit: trl filters nothing out
        dataset_num_proc=config.data.tokenize_num_workers,
        trust_remote_code=config.model.trust_remote_code,
    )


def _module_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def reward_model(model: PreTrainedModel, trust_remote_code: bool = False):
    """The causal LM's decoder (same weights, adapter made again for the classifier) under a one-output score head."""
    from accelerate.utils import is_peft_model
    from peft import get_peft_model

    lora = None
    if is_peft_model(model):
        lora = dataclasses.replace(model.peft_config["default"], task_type="SEQ_CLS")
        model = model.unload()  # the base with its adapter layers taken out; made again below
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    embedding = model.get_input_embeddings().weight
    with torch.device("meta"):  # no weights allocated for the decoder about to be replaced
        classifier = AutoModelForSequenceClassification.from_config(
            config, dtype=embedding.dtype, trust_remote_code=trust_remote_code
        )
    setattr(classifier, classifier.base_model_prefix, getattr(model, model.base_model_prefix))
    for child in classifier.children():  # the score head: the one part left on the meta device
        if any(p.is_meta for p in child.parameters()):
            child.to_empty(device=embedding.device)
            classifier._init_weights(child)
    if lora is None:
        return classifier
    if isinstance(lora.trainable_token_indices, dict):  # added tokens: the output head's rows went with the LM head
        names = _module_names(classifier)
        lora.trainable_token_indices = {k: v for k, v in lora.trainable_token_indices.items() if k in names} or None
    return get_peft_model(classifier, lora)


class AccuracyInReport(TrainerCallback):
    """report.json gets the last evaluation's accuracy, margin and loss on eval_file, under "reward_model".

    Added after the run's own callbacks, so it writes after the report is written at the end of training.
    """

    def on_train_end(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / REPORT_FILE
        evals = [h for h in state.log_history if EVAL_ACCURACY in h]
        if not evals or not state.is_world_process_zero or not path.is_file():
            return
        last = evals[-1]
        report = json.loads(path.read_text())
        report[REPORT_KEY] = {"step": last["step"], **{k: last[k] for k in EVAL_KEYS if k in last}}
        write_json(path, report)


def _trainer_class():
    from trl import RewardTrainer

    class RewardRunTrainer(RunHooks, RewardTrainer):
        """trl's RewardTrainer on our tokenized pairs, with the run hooks and the accuracy in report.json."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(AccuracyInReport())

    return RewardRunTrainer


def build_trainer(config: Config, args, model, tokenizer, data: TaskData, callbacks=()):
    classifier = reward_model(model, config.model.trust_remote_code)
    logger.info(
        f"reward model: {type(classifier).__name__}, "
        f"{sum(p.numel() for p in classifier.parameters() if p.requires_grad):,} trainable parameters"
    )
    return dpo.trl_trainer(_trainer_class(), config, args, classifier, tokenizer, data, callbacks)


def check_rm_values(values: dict[str, Any]) -> list[str]:
    problems = check_template_keys(values)
    center = values.get("rm_center_rewards_coefficient")
    if center is not None and not center >= 0:
        problems.append(f"key 'rm_center_rewards_coefficient': must be 0 or more (0.01 is usual), got {center}")
    init = values.get("lora_init", "default")
    if init in BASE_REWRITING_INITS and values.get("train_mode", "lora") in ("lora", "qlora"):
        problems.append(
            f"key 'lora_init': {init!r} rewrites the base weights for the causal LM's adapter, which the reward "
            "model replaces with its classifier's; use lora_init 'default' or 'gaussian' with task_type 'rm'"
        )
    return problems


TASK = Task("rm", build_data, build_trainer, checks=(check_rm_values,), training_arguments=rm_arguments)
