"""FSDP2 (PyTorch's `fully_shard`, DTensor parameters) through TrainingArguments and accelerate, on GPUs and the CPU.

Switched on by two config keys that go to TrainingArguments as they are:
`"fsdp": "full_shard"` and `"fsdp_config": {"fsdp_version": 2, ...}`. `torchrun --nproc_per_node=N train.py`
shards over N ranks; a plain `python train.py` runs as a one-rank launch, as DeepSpeed does
(component/training/distributed.py). Checkpoints during training are sharded when
`state_dict_type` is SHARDED_STATE_DICT (torch.distributed.checkpoint, one file per rank, resumable); the
run's last save is always consolidated (`full_state_dict_for_final_save`): a plain `model.safetensors`
or adapter.

`fsdp_problems(values)` is a config check (the task registry hands it to `load_config`): every FSDP
setting the run cannot honour is a config error, before anything is written; never a quiet DDP run.

Why the CPU needs a hand (accelerate 1.15): `AcceleratorState` turns to FSDP only for GPU-like process
groups (MULTI_GPU, MULTI_NPU, ...). On a gloo CPU group (MULTI_CPU) it drops the plugin without a word and
the Trainer wraps the model in DDP: the silent fallback of issue 21. No accelerate setting changes that
(ACCELERATE_USE_FSDP is read in the same GPU-only branch), and PyTorch's `fully_shard` itself runs on the
CPU over gloo. So `enable_on_cpu` does for a CPU group what accelerate does for a GPU group (the FSDP
distributed type, the plugin, its mixed precision), right after the Trainer creates its Accelerator.
tests/test_fsdp.py fails loudly if accelerate starts doing it itself or keeps its state differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from loguru import logger

from component.config import suggest
from component.config.arguments import BASE_REWRITING_INITS
from component.config.checks import choice_problems

FSDP_VERSION = 2
FULL_STATE_DICT = "FULL_STATE_DICT"
SHARDED_STATE_DICT = "SHARDED_STATE_DICT"
STATE_DICT_TYPES = (FULL_STATE_DICT, SHARDED_STATE_DICT)  # FSDP2 has no LOCAL_STATE_DICT
WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
# `fsdp` words (transformers' legacy string form): FSDP2 knows two sharding strategies.
SHARDING_WORDS = ("full_shard", "shard_grad_op")  # reshard after forward, or keep the gathered weights
OFFLOAD_WORD = "offload"
FSDP1_WORDS = ("hybrid_shard", "hybrid_shard_zero2", "no_shard")
FSDP_WORDS = (*SHARDING_WORDS, OFFLOAD_WORD, "auto_wrap")
# fsdp_config keys (transformers strips a leading "fsdp_"), and what each takes.
BOOL_KEYS = ("reshard_after_forward", "cpu_offload", "activation_checkpointing", "cpu_ram_efficient_loading")
FSDP2_KEYS = (
    "version",
    *BOOL_KEYS,
    "state_dict_type",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "min_num_params",
)
FSDP1_KEYS = ("forward_prefetch", "backward_prefetch", "use_orig_params", "sync_module_states", "limit_all_gathers")
XLA_KEYS = ("xla", "xla_fsdp_v2", "xla_fsdp_grad_ckpt", "xla_fsdp_settings")
# Task types whose trainer (FinetuneTrainer) is proven under FSDP here; trl's trainers keep a reference
# model or generate, which these tests do not cover.
FSDP_TASKS = ("sft", "pretrain")
CPU_FSDP_NOTE = "FSDP2 on a CPU (gloo) process group: accelerate would run DDP; its state is set to FSDP here"


def requested(values: dict[str, Any]) -> bool:
    """FSDP asked for: `fsdp` set to anything but false/empty."""
    return bool(values.get("fsdp"))


def fsdp_words(value: Any) -> list[str]:
    """The words of a legacy `fsdp` value ("full_shard auto_wrap", a list); none for `true`."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return []


def read_fsdp_config(value: Any) -> tuple[Optional[dict], Optional[str]]:
    """`fsdp_config` as a dict with transformers' key names (no "fsdp_" prefix), or a problem."""
    if value is None:
        return {}, None
    if isinstance(value, str):
        try:
            value = json.loads(Path(value).read_text())
        except OSError:
            return None, f"key 'fsdp_config': file {value!r} not found"
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, f"key 'fsdp_config': {value!r} is not a JSON object"
    if not isinstance(value, dict):
        return None, f"key 'fsdp_config': expected an object (or a JSON file), got {value!r}"
    return {k.removeprefix("fsdp_"): v for k, v in value.items()}, None


def _is_bool(value: Any) -> bool:
    # JSON booleans only: transformers reads several of these keys by truthiness, so the text "false" would
    # switch them on (cpu_offload: a silently offloaded run).
    return isinstance(value, bool)


def _truthy(value: Any) -> bool:
    return value is True


def _key_problems(settings: dict) -> list[str]:
    problems = []
    for key in settings:
        if key in FSDP1_KEYS:
            problems.append(f"key 'fsdp_config.{key}': FSDP1 only; FSDP2 has no such setting (remove it)")
        elif key in XLA_KEYS:
            if settings[key]:  # a saved train_args.json holds them all, false
                problems.append(f"key 'fsdp_config.{key}': PyTorch/XLA (TPU) FSDP, not supported here (remove it)")
        elif key not in FSDP2_KEYS:
            hint = suggest(key, FSDP2_KEYS)
            problems.append(
                f"key 'fsdp_config.{key}': unknown FSDP setting; transformers would ignore it"
                + (f" (did you mean 'fsdp_{hint}'?)" if hint else f"; known: {', '.join(FSDP2_KEYS)}")
            )
    return problems


def _value_problems(settings: dict) -> list[str]:
    problems = []
    version = settings.get("version", FSDP_VERSION)
    if version == 1 or version == "1":
        problems.append(
            "key 'fsdp_config.fsdp_version': 1 (FSDP1, FullyShardedDataParallel's flat parameters) is refused: "
            "transformers deprecates it and only FSDP2 is proven equal to one process here; use fsdp_version 2"
        )
    elif version not in (FSDP_VERSION, str(FSDP_VERSION)):
        problems.append(f"key 'fsdp_config.fsdp_version': expected 2, got {version!r}")
    for key in BOOL_KEYS:
        if key in settings and not _is_bool(settings[key]):
            problems.append(
                f"key 'fsdp_config.fsdp_{key}': expected true or false (a JSON boolean, not text), got {settings[key]!r}"
            )
    kind = str(settings.get("state_dict_type", FULL_STATE_DICT)).upper()
    problems += choice_problems("fsdp_config.fsdp_state_dict_type", kind, STATE_DICT_TYPES)
    problems += choice_problems(
        "fsdp_config.fsdp_auto_wrap_policy", settings.get("auto_wrap_policy", WRAP_POLICIES[0]), WRAP_POLICIES
    )
    return problems


def _word_problems(value: Any) -> list[str]:
    if value is True:
        return []
    if not isinstance(value, (str, list, tuple)):
        return [f"key 'fsdp': expected true or sharding words ({', '.join(FSDP_WORDS)}), got {value!r}"]
    problems = []
    for word in fsdp_words(value):
        if word in FSDP1_WORDS:
            problems.append(f"key 'fsdp': {word!r} is FSDP1 only (refused); FSDP2 does full_shard or shard_grad_op")
        else:
            problems += choice_problems("fsdp", word, FSDP_WORDS)
    if len([w for w in fsdp_words(value) if w in SHARDING_WORDS]) > 1:
        problems.append("key 'fsdp': give one of full_shard, shard_grad_op")
    return problems


def offload_requested(values: dict[str, Any], settings: dict) -> bool:
    return OFFLOAD_WORD in fsdp_words(values.get("fsdp")) or _truthy(settings.get("cpu_offload"))


def _run_problems(values: dict[str, Any], settings: dict, gpu: bool) -> list[str]:
    """FSDP combined with the rest of the config."""
    problems = []
    if values.get("deepspeed"):
        problems.append("keys 'fsdp' and 'deepspeed': choose one; both shard the model and its optimizer")
    task = values.get("task_type", "sft")
    if task not in FSDP_TASKS:
        problems.append(
            f"key 'fsdp': task_type {task!r} is not proven under FSDP here (only {', '.join(FSDP_TASKS)}); "
            "use torchrun DDP or DeepSpeed"
        )
    mode = values.get("train_mode", "lora")
    if mode == "qlora":
        problems.append(
            "key 'fsdp': train_mode 'qlora' is refused: FSDP2 shards bitsandbytes' 4-bit weights only when they "
            "are stored in a float dtype (bnb_4bit_quant_storage = the compute dtype, e.g. bfloat16); this tool "
            "loads them in uint8 storage, which accelerate leaves out of sharding (a full copy on every rank), "
            "and bitsandbytes' 4-bit layers cannot be proven here on the CPU. Use train_mode 'lora' with FSDP, "
            "or qlora under torchrun DDP / DeepSpeed ZeRO-2"
        )
    if mode == "freeze":
        problems.append("key 'fsdp': train_mode 'freeze' is not proven under FSDP here; use 'full' or 'lora'")
    if values.get("lora_init", "default") in BASE_REWRITING_INITS and mode in ("lora", "qlora"):
        problems.append(
            f"key 'lora_init': {values['lora_init']!r} is converted at the end from the whole adapter and base on "
            "one rank (component/model/loading.py), which FSDP holds sharded; refused with fsdp"
        )
    if _truthy(settings.get("activation_checkpointing")) and (
        values.get("activation_checkpointing") or values.get("gradient_checkpointing")
    ):
        problems.append(
            "keys 'activation_checkpointing' and 'fsdp_config.fsdp_activation_checkpointing': choose one "
            "(FSDP's own is preferred under FSDP: the other gathers each layer's weights again in backward)"
        )
    if offload_requested(values, settings) and not gpu:
        problems.append(
            "key 'fsdp_config.fsdp_cpu_offload': FSDP's offload keeps parameters in CPU memory between uses on "
            "a GPU; this machine has no CUDA GPU, so there is nothing to offload (remove it)"
        )
    if values.get("save_only_model") and str(settings.get("state_dict_type", "")).upper() == SHARDED_STATE_DICT:
        problems.append(
            "keys 'save_only_model' and 'fsdp_config.fsdp_state_dict_type' SHARDED_STATE_DICT: transformers "
            "cannot save a sharded model without its optimizer; choose one"
        )
    return problems


def fsdp_problems(values: dict[str, Any]) -> list[str]:
    """Problems with the `fsdp` / `fsdp_config` keys, alone and with the rest of the config."""
    settings, problem = read_fsdp_config(values.get("fsdp_config"))
    if not requested(values):
        if values.get("fsdp_config") is not None:
            return [
                "key 'fsdp_config': set, but 'fsdp' is not, so FSDP would stay off; "
                'add "fsdp": "full_shard" (or remove fsdp_config)'
            ]
        return []
    if problem:
        return [problem]
    import torch  # only for a config that asks for FSDP

    return [
        *_word_problems(values.get("fsdp")),
        *_key_problems(settings),
        *_value_problems(settings),
        *_run_problems(values, settings, torch.cuda.is_available()),
    ]


# ---------------------------------------------------------------- the run


def enable_on_cpu(accelerator, plugin_args: Optional[dict]) -> bool:
    """Give a CPU (gloo) process group the FSDP state accelerate gives a GPU group; True when it did.

    Called right after the Trainer creates its Accelerator. The same steps as the GPU branch of
    `AcceleratorState.__init__`: plugin with the run's mixed precision, distributed type FSDP, and
    PartialState's distributed type, from which every later AcceleratorState is refreshed.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not plugin_args or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    logger.info(CPU_FSDP_NOTE)
    return True


def full_state_dict_for_final_save(accelerator) -> None:
    """The run's last save gathers the whole model on rank 0 (a plain model.safetensors or adapter), however
    the checkpoints were saved: accelerate's documented switch from sharded training to a full final save."""
    accelerator.state.fsdp_plugin.set_state_dict_type(FULL_STATE_DICT)
