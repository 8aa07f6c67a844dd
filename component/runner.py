"""One training run, from a validated config to saved outputs.

The order matters: the run's arguments are built first (they set up the
process state), then everything that can fail on user input (resume
setting, tokenizer, data) runs before `output_dir` is created, so a bad run
leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loguru import logger
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from component.config import Config, save_config
from component.config.arguments import FULL_WEIGHT_MODES
from component.config.checks import check_data_paths
from component.data.sft import save_problems, save_summary
from component.data.splits import TaskData
from component.logs import log_to_file
from component.model.loading import load_model, load_tokenizer, save_converted_adapter
from component.model.quantization import apply_optimizer_fallback
from component.ranks import is_main_process
from component.tasks.registry import task_for
from component.training.checkpoints import remove_checkpoints, resolve_resume
from component.training.outputs import check_output_dir, write_meta
from component.training.report import report_on_exit
from component.training.safety import handlers_restored, raise_if_interrupted


def prepare_output_dir(config: Config, args: TrainingArguments, data: TaskData) -> str:
    out = config.output_dir
    if is_main_process():
        Path(out).mkdir(parents=True, exist_ok=True)
        log_to_file(out)
        save_config(config.to_dict(args), out)
        save_summary(data.summary, out)
        listed = save_problems(data.problems, out)
        if listed:
            logger.warning(f"skipped {len(data.problems)} invalid lines; listed in {listed}")
        write_meta(config, out, finished=False)
    return out


def run(config: Config, callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """Train as the config says; `callbacks` are added after the run's own (tests, benchmarks)."""
    task = task_for(config.method.task_type)
    args = task.training_arguments(config)  # process state, devices, optimizer fallback
    set_seed(args.seed)
    check_output_dir(config)
    check_data_paths(config)  # every missing data file named by its key, before the tokenizer loads
    resume = resolve_resume(config, args)  # before any work: a wrong resume setting costs nothing
    tokenizer = load_tokenizer(config.model)
    data = task.build_data(config, args, tokenizer)
    if resume is None and config.method.overwrite_output_dir and is_main_process():
        remove_checkpoints(config.output_dir)  # never resume into the replaced run later
    out = prepare_output_dir(config, args, data)
    apply_optimizer_fallback(args)  # after saving: train_args.json keeps the configured optim; logged
    model = load_model(config, tokenizer)
    trainer = task.build_trainer(config, args, model, tokenizer, data, callbacks)
    # report.json also on an error or a signal; the previous signal handlers come back however it ends.
    with report_on_exit(trainer.run_report), handlers_restored(trainer.interrupt):
        trainer.train(resume_from_checkpoint=resume)
        raise_if_interrupted(trainer, config)  # a signal: checkpoint saved; say how to resume, exit non-zero
    trainer.save_model(out)
    if is_main_process():
        save_converted_adapter(trainer.model, config, out)  # PiSSA/OLoRA: for the original base
        tokenizer.save_pretrained(out)
        write_meta(config, out, finished=True)
        logger.info(f"saved {'model' if config.method.train_mode in FULL_WEIGHT_MODES else 'adapter'} to {out}")
    return trainer
