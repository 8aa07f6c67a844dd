"""The SimPO task: preference pairs trained with trl's CPOTrainer in its SimPO mode (trl.experimental.cpo).

SimPO (Meng et al., 2024) needs no reference model: its loss is -log σ(β·(mean log-prob of the
chosen reply − mean log-prob of the rejected one) − γ), the log-probs averaged over each reply's
tokens. trl 1.16 has it as `CPOConfig(loss_type="simpo", cpo_alpha=0)`, not among DPOTrainer's
loss types. The pairs, their columns and the run hooks are ORPO's (component/tasks/orpo.py):
rendered with our templates, cut once, and never re-tokenized by trl.
"""

from __future__ import annotations

from typing import Any

from component.config import Config
from component.data.tokenizer_template import check_template_keys
from component.tasks import dpo, orpo
from component.tasks.task import Task
from component.training.setup import training_arguments
from component.training.trainer import RunHooks


def _cpo_module():
    return dpo.trl_experimental("cpo")


def simpo_arguments(config: Config):
    """trl's CPOConfig in SimPO mode: every TrainingArguments value of ours, plus β and the margin γ."""
    return training_arguments(
        config,
        _cpo_module().CPOConfig,
        loss_type="simpo",
        cpo_alpha=0.0,  # no NLL term: SimPO proper
        beta=config.method.simpo_beta,
        simpo_gamma=config.method.simpo_gamma,
        max_length=config.data.max_seq_length,  # pairs already fit: nothing is cut again
        dataset_num_proc=config.data.tokenize_num_workers,
        trust_remote_code=config.model.trust_remote_code,
    )


def _trainer_class():
    class SimPORunTrainer(RunHooks, _cpo_module().CPOTrainer):
        """trl's CPOTrainer (SimPO) on our tokenized pairs, with the run hooks."""

        def tokenize_row(self, feature, model=None):
            if "chosen_input_ids" in feature:  # ours (orpo.orpo_row): rendered with the template, already cut
                return {}
            return super().tokenize_row(feature, model)

        def training_step(self, model, inputs, *args, **kwargs):
            return super().training_step(model, {**inputs, **orpo.counted(inputs)}, *args, **kwargs)

    return SimPORunTrainer


def build_trainer(config: Config, args, model, tokenizer, data, callbacks=()):
    return dpo.trl_trainer(_trainer_class(), config, args, model, tokenizer, data, callbacks)


def check_simpo_values(values: dict[str, Any]) -> list[str]:
    problems = check_template_keys(values)
    beta, gamma = values.get("simpo_beta", 2.0), values.get("simpo_gamma", 0.5)
    if not beta > 0:
        problems.append(f"key 'simpo_beta': must be positive (2 to 10 in the paper), got {beta}")
    if not gamma >= 0:
        problems.append(f"key 'simpo_gamma': the target margin must be >= 0, got {gamma}")
    return problems


TASK = Task("simpo", orpo.build_data, build_trainer, checks=(check_simpo_values,), training_arguments=simpo_arguments)
