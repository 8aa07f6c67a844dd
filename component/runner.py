"""One training run, from a validated config to saved outputs.

The order matters: everything that can fail on user input (tokenizer, data)
runs before `output_dir` is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loguru import logger
from transformers import Trainer, set_seed

from component import distributed, dpo, pretrain, sft
from component.config import Config, is_main_process, save_config
from component.logs import log_to_file
from component.model import load_model, load_tokenizer
from component.outputs import check_output_dir, write_meta
from component.report import report_on_exit
from component.resume import remove_checkpoints, resolve_resume
from component.safety import add_safety_callbacks, handlers_restored, raise_if_interrupted
from component.sft_data import save_problems, save_summary
from component.trainer import FinetuneTrainer, default_callbacks

# task_type -> function building its data. Other task types register here.
TASK_DATA: dict[str, Callable] = {"sft": sft.build_data, "pretrain": pretrain.build_data, "dpo": dpo.build_data}
# task_type -> function building its trainer; default: transformers' Trainer.
TASK_TRAINERS: dict[str, Callable] = {"pretrain": pretrain.build_trainer, "dpo": dpo.build_trainer}


def build_trainer(config: Config, model, tokenizer, data) -> Trainer:
    return FinetuneTrainer(
        model=model,
        args=config.training,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
        callbacks=default_callbacks(),
        lean_loss=config.method.lean_loss,
    )


def prepare_output_dir(config: Config, data) -> str:
    out = config.training.output_dir
    if is_main_process():
        Path(out).mkdir(parents=True, exist_ok=True)
        log_to_file(out)
        save_config(config, out)
        save_summary(data.summary, out)
        listed = save_problems(data.problems, out)
        if listed:
            logger.warning(f"skipped {len(data.problems)} invalid lines; listed in {listed}")
        write_meta(config, out, finished=False)
    return out


def run(config: Config) -> Trainer:
    set_seed(config.training.seed)
    distributed.emulate_launch_for_deepspeed(config.training.deepspeed)  # plain `python train.py`
    check_output_dir(config)
    resume = resolve_resume(config)  # before any work: a wrong resume setting costs nothing
    tokenizer = load_tokenizer(config.model)
    data = TASK_DATA[config.method.task_type](config, tokenizer)
    if resume is None and config.method.overwrite_output_dir and is_main_process():
        remove_checkpoints(config.training.output_dir)  # never resume into the replaced run later
    out = prepare_output_dir(config, data)
    model = load_model(config)
    trainer = TASK_TRAINERS.get(config.method.task_type, build_trainer)(config, model, tokenizer, data)
    add_safety_callbacks(trainer, config.method.max_nonfinite_steps)
    with report_on_exit(trainer), handlers_restored(trainer):  # report.json also on an error or a signal
        trainer.train(resume_from_checkpoint=resume)
        raise_if_interrupted(trainer, config)  # a signal: checkpoint saved; say how to resume, exit non-zero
    trainer.save_model(out)
    if is_main_process():
        tokenizer.save_pretrained(out)
        write_meta(config, out, finished=True)
        logger.info(f"saved {'adapter' if config.method.train_mode != 'full' else 'model'} to {out}")
    return trainer
