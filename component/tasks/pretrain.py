"""The pretrain task: packed text blocks (component/data/packing.py, or streamed while training:
component/data/streaming.py), a packing mode checked on the loaded model, and transformers' Trainer.

How attention is kept inside a document is chosen per model (`PackingMode`),
after a check on the loaded model: the model's own handling of restarting
position_ids (attention_mask None, no cache), else a block-diagonal 4D mask,
else one row per document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from loguru import logger
from transformers import TrainingArguments

from component.config import Config
from component.data import streaming
from component.data.cache import cache_root
from component.data.packing import PackedCollator, PackingMode, load_packed
from component.data.splits import TaskData, build_splits
from component.model.model_types import model_type_info
from component.tasks.task import Task
from component.training.setup import training_arguments
from component.training.trainer import build_finetune_trainer

# The probe that checks document isolation on the loaded model: two short
# random documents, compared packed and alone.
PROBE_LENGTHS = (7, 5)
PROBE_SEED = 1234
# Largest |logit difference| accepted as "the same", relative to the largest |logit| (at least 1), by
# dtype: kernels round differently for different lengths (SmolLM2 in fp32: ~1e-4 on logits of ~20),
# while attending across a boundary moves logits by far more.
ISOLATION_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------- isolation check


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    # The embedding is never quantized: its dtype is the one activations run in.
    weight = model.get_input_embeddings().weight
    return weight.device, weight.dtype


def documents_isolated(model, collator: PackedCollator) -> bool:
    """Are the logits of a document inside a packed block those of the document alone?"""
    device, dtype = _model_device_dtype(model)
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(PROBE_SEED)
    docs = [torch.randint(0, vocab, (n,), generator=gen) for n in PROBE_LENGTHS]
    block = {"input_ids": torch.cat(docs).tolist(), "position_ids": [p for d in docs for p in range(len(d))]}
    packed = collator([block])
    packed.pop("labels")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            rows = model(**{k: v.to(device) for k, v in packed.items()}, use_cache=False).logits
            if collator.mode == PackingMode.UNPACKED:
                got = rows[1, : PROBE_LENGTHS[1]]
            else:
                got = rows[0, PROBE_LENGTHS[0] :]
            alone = model(input_ids=docs[1][None].to(device), use_cache=False).logits[0]
    except Exception as exc:  # an attention that rejects this batch form cannot use it
        logger.info(f"packing mode {collator.mode.value}: not usable with this model ({type(exc).__name__}: {exc})")
        return False
    finally:
        model.train(was_training)
    diff = (got.float() - alone.float()).abs().max().item()
    tolerance = ISOLATION_RTOL.get(dtype, ISOLATION_RTOL[torch.bfloat16]) * max(1.0, alone.float().abs().max().item())
    ok = diff <= tolerance
    logger.info(
        f"packing mode {collator.mode.value}: max |logit diff| packed vs alone = {diff:.3g}, tolerance "
        f"{tolerance:.3g} ({'isolated' if ok else 'LEAKS across documents'})"
    )
    return ok


def _mask_dtype(model) -> Optional[torch.dtype]:
    # sdpa reads a boolean mask (True = attend); eager adds the mask to the scores.
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        return None
    return _model_device_dtype(model)[1]


def choose_collator(model, pad_token_id: int, verify: bool = True) -> PackedCollator:
    """The first packing mode that keeps documents apart on this model, per its model type and a check."""
    info = model_type_info(model.config.model_type)
    candidates = []
    if not info.recurrent:
        if info.padding_free:
            candidates.append(PackingMode.POSITION_IDS)
        candidates.append(PackingMode.BLOCK_MASK)
    for mode in candidates:
        collator = PackedCollator(pad_token_id, mode, _mask_dtype(model) if mode == PackingMode.BLOCK_MASK else None)
        if not verify or documents_isolated(model, collator):
            logger.info(f"pretrain packing: {mode.value}")
            return collator
    logger.warning(
        "pretrain packing: no packed form keeps documents apart on this model; each document gets its own padded row"
    )
    return PackedCollator(pad_token_id, PackingMode.UNPACKED)


# ---------------------------------------------------------------- task entry points


def pretrain_arguments(config: Config) -> TrainingArguments:
    """TrainingArguments; a streaming run also gets the settings its resume and its ranks rely on."""
    args = training_arguments(config)
    if config.data.streaming:
        streaming.configure_trainer_arguments(args)
    return args


def build_streaming_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    """train_file as a stream of packed blocks; eval_file (small) packed and cached as usual."""
    data = config.data
    stream = streaming.open_stream(
        data.train_file, tokenizer, data.max_seq_length, args, skip_invalid=data.skip_invalid_examples
    )
    logger.info(f"train data {data.train_file}: {stream.summary.describe()}")
    eval_ds = None
    if data.eval_file:
        with args.main_process_first(desc="pretrain eval data"):
            ev = load_packed(
                data.eval_file,
                tokenizer,
                data.max_seq_length,
                cache_root(config),
                data.tokenize_num_workers,
                data.skip_invalid_examples,
            )
        logger.info(f"eval data {data.eval_file}: {ev.summary.describe()}")
        eval_ds = ev.dataset
    return TaskData(stream, eval_ds, PackedCollator(tokenizer.pad_token_id), stream.summary, [])


def build_data(config: Config, args: TrainingArguments, tokenizer) -> TaskData:
    if config.data.streaming:
        return build_streaming_data(config, args, tokenizer)
    cache_dir = cache_root(config)
    build_args = dict(
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        cache_dir=cache_dir,
        num_workers=config.data.tokenize_num_workers,
        skip_invalid=config.data.skip_invalid_examples,
    )
    # Under DDP the main process builds the cache; the others wait, then read it.
    with args.main_process_first(desc="pretrain data"):
        train, eval_ds = build_splits(config, load_packed, **build_args)
    collator = PackedCollator(tokenizer.pad_token_id)  # the mode is chosen once the model is loaded
    return TaskData(train.dataset, eval_ds, collator, train.summary, train.problems)


def build_trainer(config: Config, args: TrainingArguments, model, tokenizer, data: TaskData, callbacks=()):
    from transformers.integrations import is_deepspeed_zero3_enabled

    # A cache makes the model build its own mask and ignore packed position_ids.
    model.config.use_cache = False
    # Under ZeRO-3 the weights are sharded before the Trainer exists: trust the model type's entry.
    collator = choose_collator(model, data.collator.pad_token_id, verify=not is_deepspeed_zero3_enabled())
    if isinstance(data.train, streaming.PackedStream):
        # The stream's position goes into every checkpoint and comes back on resume.
        callbacks = [*callbacks, streaming.StreamPositionCallback(data.train)]
    return build_finetune_trainer(config, args, model, tokenizer, data._replace(collator=collator), callbacks)


def check_pretrain_values(values: dict[str, Any]) -> list[str]:
    problems = []
    cache = values.get("data_cache_dir")
    if cache and Path(cache).is_file():
        problems.append(f"key 'data_cache_dir': {cache!r} is a file; give a folder")
    return problems


TASK = Task(
    "pretrain", build_data, build_trainer, checks=(check_pretrain_values,), training_arguments=pretrain_arguments
)
