"""The GRPO task: online RL from reward functions, through trl's GRPOTrainer.

Each step samples `grpo_num_generations` completions for each prompt, scores them with the
configured reward functions (component/tasks/rewards.py), and moves the policy towards the
completions that scored above their group's mean. The prompts come from any SFT format
(component/data/prompts.py): rendered with our templates and their official generation prompt,
tokenized once; trl generates from exactly those ids (`_tokenize_prompts`, the one method
overridden, guarded by tests/test_grpo.py) and stops at the template's end-of-turn token.

Full, LoRA and QLoRA: the reference for the KL term (`grpo_beta` > 0) is the base with the adapter
disabled under LoRA and QLoRA, and, in full mode, the starting weights as trl loads them again
from `model_name_or_path`. With `grpo_beta` 0 (the default, as in trl) no reference is kept.

What a run writes besides the usual (report.json, loss.png, TensorBoard): the per-step rewards
(each function's mean, their std, completion length, KL, clip ratio) in report.json's `rewards`
and in the log, `reward.png`, and `samples.jsonl`: a few prompts with their completions and
rewards at step 1 and every `grpo_samples_every` steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loguru import logger
from transformers import TrainerCallback, TrainingArguments

from component.config import Config
from component.config.arguments import FULL_WEIGHT_MODES
from component.config.checks import choice_problems
from component.data.prompts import PromptData, build_prompt_dataset, json_columns
from component.data.splits import TaskData
from component.data.template import stop_token_ids
from component.data.tokenizer_template import check_template_keys, resolve_template, use_chat_template_file
from component.ranks import is_main_process
from component.tasks import dpo, rewards
from component.tasks.task import Task
from component.training.setup import training_arguments
from component.training.trainer import RunHooks

# The loss variants of trl 1.16's GRPOConfig.loss_type that need no other setting; tests/test_grpo.py
# checks each is still among trl's.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo")
SAMPLES_FILE = "samples.jsonl"
SAMPLES_PER_STEP = 4


def _prompts(config: Config, path: str, template, tokenizer, required: tuple) -> PromptData:
    data = config.data
    built = build_prompt_dataset(
        path,
        template,
        tokenizer,
        data.max_prompt_length,
        skip_invalid=data.skip_invalid_examples,
        data_format=data.data_format,
        empty_think=data.empty_think_block,
        required=required[0],
        check_required=required[1],
    )
    logger.info(f"prompts {path}: {built.summary.describe()}")
    return built


def build_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    use_chat_template_file(tokenizer, config.data.chat_template)
    template = resolve_template(config.data.template_name, tokenizer)
    specs = rewards.reward_specs(config.method.grpo_rewards)
    required = rewards.needs_reference(specs)
    train = _prompts(config, config.data.train_file, template, tokenizer, required)
    eval_data = (
        _prompts(config, config.data.eval_file, template, tokenizer, required) if config.data.eval_file else None
    )
    # Every reward function, called once on the first prompts: a broken one fails now, before output_dir.
    columns = json_columns(train.dataset, eval_data.dataset if eval_data else None)
    checked = [rewards.CheckedReward(spec, columns) for spec in specs]
    rewards.probe(
        checked, train.dataset.select(range(min(rewards.PROBE_PROMPTS, len(train.dataset)))).to_list(), tokenizer
    )
    return TaskData(train.dataset, eval_data.dataset if eval_data else None, None, train.summary, train.problems)


def grpo_arguments(config: Config):
    """trl's GRPOConfig: every TrainingArguments value of ours, plus the GRPO options."""
    from trl import GRPOConfig

    method = config.method
    specs = rewards.reward_specs(method.grpo_rewards or [])
    return training_arguments(
        config,
        GRPOConfig,
        num_generations=method.grpo_num_generations,
        max_completion_length=method.grpo_max_completion_length,
        temperature=method.grpo_temperature,
        beta=method.grpo_beta,
        loss_type=method.grpo_loss_type,
        use_vllm=method.grpo_use_vllm,
        reward_weights=[spec.weight for spec in specs] or None,
        remove_unused_columns=False,  # the prompt data's columns go to the reward functions
        log_completions=False,  # ours: samples.jsonl
        trust_remote_code=config.model.trust_remote_code,
    )


class SampleLog(TrainerCallback):
    """samples.jsonl: at step 1 and every `every` steps, the first few completions of the step with each
    reward function's score and their weighted sum. Fed by every CheckedReward as it scores a batch, but
    only for the completions a training step generates (between its step's begin and end events: not an
    evaluation's); a resumed run first drops what the file holds past its checkpoint, as the log does."""

    def __init__(self, path: Path, every: int, specs: list[rewards.RewardSpec]):
        self.path, self.every = path, every
        self.weights = {spec.name: spec.weight for spec in specs}
        self.pending: dict[str, list[float]] = {}
        self.in_step = False

    def on_train_begin(self, args, state, control, **kwargs):
        if is_main_process() and self.path.is_file():
            kept = [
                x
                for x in self.path.read_text(encoding="utf-8").splitlines()
                if json.loads(x)["step"] <= state.global_step
            ]
            self.path.write_text("".join(f"{x}\n" for x in kept), encoding="utf-8")

    def on_step_begin(self, args, state, control, **kwargs):
        self.in_step = True

    def on_step_end(self, args, state, control, **kwargs):
        self.in_step = False

    def __call__(self, name: str, prompts, completions, values: list[float], state) -> None:
        step = (state.global_step if state is not None else 0) + 1  # the step these completions train
        if not self.in_step or not is_main_process() or not (step == 1 or step % self.every == 0):
            return
        self.pending[name] = values[:SAMPLES_PER_STEP]
        if len(self.pending) < len(self.weights):
            return
        with self.path.open("a", encoding="utf-8") as f:
            for i in range(min(SAMPLES_PER_STEP, len(completions))):
                scores = {n: v[i] for n, v in self.pending.items()}
                total = sum(self.weights[n] * v for n, v in scores.items())
                line = {"step": step, "prompt": prompts[i], "completion": completions[i], "rewards": scores}
                f.write(json.dumps({**line, "reward": total}, ensure_ascii=False) + "\n")
        self.pending = {}


def _trainer_class():
    from trl import GRPOTrainer

    class GRPORunTrainer(RunHooks, GRPOTrainer):
        """trl's GRPOTrainer on our tokenized prompts, with the run hooks."""

        def __init__(self, *args, prompt_ids: dict[str, list[int]], **kwargs):
            self.prompt_ids = prompt_ids
            super().__init__(*args, **kwargs)

        def _tokenize_prompts(self, prompts: list):
            # Our template's ids, exactly as rendered and checked; trl would tokenize the text again (adding a
            # BOS some templates already hold).
            return [self.prompt_ids[p] for p in prompts], None, {}

        def _prepare_inputs(self, generation_batch):
            inputs = super()._prepare_inputs(generation_batch)
            if self.model.training:  # the generated batch: prompt and completion tokens, counted by the report
                self.run_report.observe_batch(inputs)
            return inputs

    return GRPORunTrainer


def build_trainer(config: Config, args, model, tokenizer, data: TaskData, callbacks=()):
    template = resolve_template(config.data.template_name, tokenizer)
    # Generation stops at the template's end of turn (and EOS), as at inference; trl reads it from here.
    model.generation_config.eos_token_id = stop_token_ids(template, tokenizer)
    specs = rewards.reward_specs(config.method.grpo_rewards)
    samples = SampleLog(Path(config.output_dir) / SAMPLES_FILE, config.method.grpo_samples_every, specs)
    columns = json_columns(data.train, data.eval)
    reward_funcs = [rewards.CheckedReward(spec, columns, samples) for spec in specs]
    prompt_ids = {row["prompt"]: row["prompt_ids"] for row in data.train.select_columns(["prompt", "prompt_ids"])}
    if data.eval is not None:
        prompt_ids.update(
            {row["prompt"]: row["prompt_ids"] for row in data.eval.select_columns(["prompt", "prompt_ids"])}
        )
    return dpo.trl_trainer(
        _trainer_class(),
        config,
        args,
        model,
        tokenizer,
        data,
        (*callbacks, samples),
        reward_funcs=reward_funcs,
        prompt_ids=prompt_ids,
    )


def check_grpo_values(values: dict[str, Any]) -> list[str]:
    problems = check_template_keys(values)
    problems += rewards.reward_list_problems(values.get("grpo_rewards"))
    problems += choice_problems("grpo_loss_type", values.get("grpo_loss_type", "dapo"), GRPO_LOSS_TYPES)
    generations = values.get("grpo_num_generations", 4)
    if not isinstance(generations, int) or generations < 2:
        problems.append(
            f"key 'grpo_num_generations': GRPO compares 2 or more completions of each prompt, got {generations!r}"
        )
    elif generations >= 2:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        batch = values.get("per_device_train_batch_size", 8) * values.get("gradient_accumulation_steps", 1) * world
        if batch % generations:
            problems.append(
                f"key 'per_device_train_batch_size': each optimizer step generates per_device_train_batch_size x "
                f"gradient_accumulation_steps x ranks = {batch} completions, which must be whole groups of "
                f"grpo_num_generations ({generations}); make it a multiple"
            )
    if not values.get("grpo_max_completion_length", 64) >= 1:
        problems.append("key 'grpo_max_completion_length': must be 1 or more tokens")
    if not values.get("grpo_temperature", 1.0) > 0:
        problems.append("key 'grpo_temperature': must be above 0 (GRPO needs different completions to compare)")
    if not values.get("grpo_beta", 0.0) >= 0:
        problems.append(f"key 'grpo_beta': the KL weight must be >= 0, got {values['grpo_beta']}")
    every = values.get("grpo_samples_every", 10)
    if not isinstance(every, int) or every < 1:
        problems.append(f"key 'grpo_samples_every': a number of steps >= 1, got {every!r}")
    if values.get("train_mode", "lora") in ("lora", "qlora") and "lm_head" in (values.get("lora_target_modules") or []):
        problems.append(
            "key 'lora_target_modules': trl's GRPO computes log-probabilities from lm_head's weight directly, so a "
            'LoRA adapter on lm_head would never train; remove it (modules_to_save: ["lm_head"] trains the head)'
        )
    if values.get("grpo_use_vllm"):
        problems += _vllm_problems()
    if values.get("train_mode") in FULL_WEIGHT_MODES and values.get("grpo_beta", 0.0) > 0:
        model = str(values.get("model_name_or_path", ""))
        if model.endswith(".gguf") or values.get("add_special_tokens"):
            problems.append(
                "key 'grpo_beta': in full mode trl loads the KL reference again from model_name_or_path, which "
                "cannot be a GGUF file or lack the added tokens; use train_mode lora, or grpo_beta 0"
            )
    return problems


def _vllm_problems() -> list[str]:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return ["key 'grpo_use_vllm': vLLM generates on a GPU, and none is visible; set it false"]
    if importlib.util.find_spec("vllm") is None:
        return ["key 'grpo_use_vllm': vllm is not installed (pip install vllm, matching torch); or set it false"]
    return []


TASK = Task("grpo", build_data, build_trainer, checks=(check_grpo_values,), training_arguments=grpo_arguments)
