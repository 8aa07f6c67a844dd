"""One training run, from a validated config to saved outputs.

The order matters: everything that can fail on user input (tokenizer, data)
runs before `output_dir` is created, so a bad run leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from loguru import logger
from transformers import Trainer, set_seed

from component import sft
from component.config import Config, is_main_process, save_config
from component.logs import log_to_file
from component.model import load_model, load_tokenizer
from component.outputs import check_output_dir, write_meta
from component.sft_data import save_problems, save_summary
from component.trainer import FinetuneTrainer, default_callbacks

# task_type -> function building its data. Other task types register here.
TASK_DATA: dict[str, Callable] = {"sft": sft.build_data}
# task_type -> function building its trainer; default: transformers' Trainer.
TASK_TRAINERS: dict[str, Callable] = {}


def build_trainer(config: Config, model, tokenizer, data) -> Trainer:
    return FinetuneTrainer(
        model=model,
        args=config.training,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
        callbacks=default_callbacks(),
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
    check_output_dir(config)
    tokenizer = load_tokenizer(config.model)
    data = TASK_DATA[config.method.task_type](config, tokenizer)
    out = prepare_output_dir(config, data)
    model = load_model(config)
    trainer = TASK_TRAINERS.get(config.method.task_type, build_trainer)(config, model, tokenizer, data)
    trainer.train()
    trainer.save_model(out)
    if is_main_process():
        tokenizer.save_pretrained(out)
        write_meta(config, out, finished=True)
        logger.info(f"saved {'adapter' if config.method.train_mode != 'full' else 'model'} to {out}")
    return trainer
