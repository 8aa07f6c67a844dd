"""The typed configuration: one dataclass per concern, every field documented.

`Config` holds our three argument records and the TrainingArguments values as
a plain dict. transformers' `TrainingArguments` object is built by the runner
(component/training/setup.py), because constructing it sets up the process
group and devices; a `Config` is only data.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from transformers import TrainingArguments

RESOLVED_CONFIG_NAME = "train_args.json"
# The key a saved train_args.json names its source config with; read back, it is a record, not a setting.
SOURCE_KEY = "config_file"
# TrainingArguments fields that may hold secrets; never logged or saved.
SECRET_KEYS = ("hub_token", "push_to_hub_token")
AUTO_DATA_FORMAT = "auto"
# SFT data formats (component/data/formats.py holds each one's converter); auto: detected per file.
# Modes that train (and save) the model's own weights rather than an adapter.
FULL_WEIGHT_MODES = ("full", "freeze")
# LoRA variants and initialisations (component/model/loading.py maps them to peft's LoraConfig).
LORA_VARIANTS = ("lora", "dora", "rslora")
LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
# Inits that rewrite the base weights: not possible on a 4-bit base, and converted when saved.
BASE_REWRITING_INITS = ("pissa", "olora")
DATA_FORMATS = (AUTO_DATA_FORMAT, "conversation", "messages", "sharegpt", "alpaca", "prompt_completion")
# How a `datasets` list becomes one training set (component/data/mixing.py).
MIX_STRATEGIES = ("concatenate", "interleave")
# The keys of one `datasets` / `eval_datasets` entry (component/data/sources.py's DatasetSpec).
DATASET_ENTRY_KEYS = (
    "path",
    "format",
    "split",
    "subset",
    "revision",
    "weight",
    "num_samples",
    "columns",
    "roles",
    "train_on",
)
DEFAULT_OPTIM = "adamw_torch_fused"  # transformers' and TRL's default: no per-parameter temporaries in the step
# Our defaults for TrainingArguments, where transformers' default is wrong
# for this tool. A config may override each of them.
TRAINING_DEFAULTS: dict[str, Any] = {
    "report_to": ["tensorboard"],
    "remove_unused_columns": False,  # our collators read the columns themselves
    "logging_first_step": True,
    "save_strategy": "steps",
    "optim": DEFAULT_OPTIM,
}


@dataclass
class ModelArguments:
    """Which model to fine-tune and how to load it."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A hub id, a local folder, or a local .gguf file (dequantized on load)."},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer location, when it differs from the model's."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped with the model. Only for models you trust."},
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "Attention backend (sdpa, eager, flash_attention_2); None: our choice."}
    )
    add_special_tokens: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Tokens to add to the tokenizer as special (one id each). The embedding grows to a multiple "
            "of 64, new rows start at the mean of the old ones; under LoRA only the new rows (and an untied "
            "head's) train. The tokenizer is saved with the run."
        },
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Load .bin/.pt/.pth weight files (Python pickles, which can run code when loaded) "
            "from the model folder or a checkpoint. Default: safetensors only."
        },
    )


@dataclass
class DataArguments:
    """Where the data is and how it becomes tokens."""

    train_file: Optional[str] = field(default=None, metadata={"help": "Training data, JSONL."})
    eval_file: Optional[str] = field(
        default=None, metadata={"help": "Optional evaluation data, JSONL; eval loss is logged every eval_steps."}
    )
    datasets: Optional[list[dict[str, Any]]] = field(
        default=None,
        metadata={
            "help": "SFT: the training datasets instead of train_file, each {path, format, split, subset, "
            "revision, weight or num_samples, columns}; path: a local .jsonl/.json/.parquet/.arrow file, "
            "a folder of them, a save_to_disk folder, or a Hub id (README, Data formats)."
        },
    )
    eval_datasets: Optional[list[dict[str, Any]]] = field(
        default=None,
        metadata={
            "help": "SFT: evaluation datasets instead of eval_file, entries as in datasets, always concatenated."
        },
    )
    mix_strategy: str = field(
        default="concatenate",
        metadata={
            "help": "How the datasets become one: concatenate (in order; num_samples sizes each) or "
            "interleave (drawn by weight with mix_seed, until the first dataset runs out)."
        },
    )
    mix_seed: Optional[int] = field(
        default=None, metadata={"help": "Seed of the interleaving and of num_samples' up-sampling; default: seed."}
    )
    template_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Chat template (see component/data/template_registry.py), or 'auto' for the tokenizer's own."
        },
    )
    data_format: str = field(
        default=AUTO_DATA_FORMAT,
        metadata={
            "help": "SFT data format: auto (detected per file from the first record's keys), conversation, "
            "messages, sharegpt, alpaca or prompt_completion (README, Data formats)."
        },
    )
    eval_tasks: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Benchmarks run when training ends (lm-eval task names, or local tasks in data/eval_tasks/), "
            "the fine-tuned model against its base; results in eval_results.json, eval.png and report.json."
        },
    )
    eval_prompts: Optional[str] = field(
        default=None,
        metadata={"help": "A file of prompts answered when training ends, base beside fine-tuned, in samples.md."},
    )
    batching: str = field(
        default="examples",
        metadata={
            "help": "examples: per_device_train_batch_size examples per micro-batch; tokens: whole examples up to "
            "max_tokens_per_batch tokens, packed best-fit in one padding-free row (component/data/batching.py)."
        },
    )
    max_tokens_per_batch: Optional[int] = field(
        default=None, metadata={"help": "batching tokens: the micro-batch's token budget (>= max_seq_length)."}
    )
    chat_template: Optional[str] = field(
        default=None,
        metadata={
            "help": "A Jinja chat template file that replaces the tokenizer's own (template_name 'auto'); "
            "it is saved with the tokenizer, so inference renders as training did."
        },
    )
    empty_think_block: str = field(
        default="supervised",
        metadata={
            "help": "Qwen3-style empty think block before a reply without reasoning: supervised (it follows "
            "the official generation prompt) or prompt (it joins the prompt, as enable_thinking=False puts it)."
        },
    )
    reasoning_history: str = field(
        default="whole",
        metadata={
            "help": "Templates that drop reasoning from earlier turns (Qwen3): whole (the official rendering "
            "of the conversation) or per_turn (also one example per such turn, rendered as at inference)."
        },
    )
    max_seq_length: int = field(default=1024, metadata={"help": "Longest tokenized example; longer ones are cut."})
    max_prompt_length: int = field(
        default=512, metadata={"help": "DPO, ORPO, KTO, rm: the prompt is never cut below this many tokens."}
    )
    tokenize_num_workers: int = field(default=1, metadata={"help": "Processes used to tokenize the data."})
    skip_invalid_examples: bool = field(
        default=False,
        metadata={"help": "Skip malformed data lines (listed in output_dir) instead of stopping."},
    )
    padding_free: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Concatenate each batch into one row without padding; None: on where the model "
            "type is verified for it (component/model/model_types.py), off for recurrent models."
        },
    )
    data_cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Pretrain: folder for the tokenized, packed data cache; default: data_cache/ next to "
            "output_dir. Reused only while the files, tokenizer and max_seq_length are unchanged."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Pretrain: read, tokenize and pack train_file while training, for corpora larger than "
            "memory (no cache; needs max_steps); a resumed run continues at the exact block "
            "(component/data/streaming.py)."
        },
    )


@dataclass
class MethodArguments:
    """What kind of training: task, mode and the LoRA adapter's shape."""

    task_type: str = field(
        default="sft",
        metadata={"help": "One of: sft, pretrain, dpo, orpo, simpo, kto, rm (a reward model), grpo (online RL)."},
    )
    train_mode: str = field(
        default="lora",
        metadata={"help": "One of: full, lora, qlora, freeze (the base's own last layers or named modules train)."},
    )
    freeze_trainable_layers: int = field(
        default=2, metadata={"help": "train_mode freeze: how many of the last decoder layers train."}
    )
    freeze_trainable_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "train_mode freeze: also train the parameters whose names contain one of these (e.g. "
            "lm_head, norm); with freeze_trainable_layers 0, only these."
        },
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_fp32_output: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Under bf16/fp16 autocast, each LoRA layer adds its adapter to an fp32 base output and returns "
            "fp32 (matmuls stay bf16), so small adapter updates are not rounded away (component/model/lora_layers.py). "
            "Default: on for bf16 on the CPU (no CUDA, or use_cpu; the demo's loss then within 0.3% of fp32's, not "
            "1.3%; 6-12% slower), off on a GPU."
        },
    )
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Module names to adapt; default: every linear layer but the output head."},
    )
    lora_variant: str = field(
        default="lora",
        metadata={
            "help": "lora; dora (weight-decomposed: a magnitude vector per output, slower steps); rslora "
            "(the update scaled by alpha/sqrt(r), steadier at high rank)."
        },
    )
    lora_init: str = field(
        default="default",
        metadata={
            "help": "default (B = 0: the model starts as the base); gaussian; pissa or olora (the adapter "
            "starts from the base weights' principal directions, SVD or QR, and the base keeps the rest; "
            "the saved adapter is converted to apply to the original base; not with qlora); loftq (qlora only: the "
            "adapter starts where it cancels most of the 4-bit quantization error, from the base's safetensors)."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."},
    )
    lora_layers_to_transform: Optional[list[int]] = field(
        default=None, metadata={"help": "Adapt only these decoder layers (0-based); default: every layer."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that holds a finished run."}
    )
    resume_from_checkpoint: Optional[Union[bool, str]] = field(
        default=None,
        metadata={
            "help": "true: resume from the newest complete checkpoint in output_dir; a path: from that "
            "checkpoint. Absent while output_dir holds checkpoints: an error saying how to go on."
        },
    )
    max_nonfinite_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps with a NaN/inf loss or gradient to skip before the run stops; 0: stop "
            "at the first."
        },
    )
    lean_loss: bool = field(
        default=True,
        metadata={
            "help": "Apply the output head only where labels are set, in chunks (component/training/loss.py); "
            "false: the model's own full-logits loss."
        },
    )
    dpo_beta: float = field(
        default=0.1, metadata={"help": "DPO: strength of the pull towards the reference model (trl's beta)."}
    )
    dpo_loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "DPO: trl loss type(s): sigmoid (DPO), ipo, hinge, robust, sft (adds an NLL term), ..."},
    )
    dpo_loss_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "DPO: one weight per dpo_loss_type entry; default: all 1."}
    )
    dpo_label_smoothing: float = field(
        default=0.0, metadata={"help": "DPO: probability a preference label is flipped (robust/cDPO), in [0, 0.5)."}
    )
    dpo_precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "DPO: score the data with the reference model once before training; full mode then "
            "holds no second model copy."
        },
    )
    orpo_beta: float = field(
        default=0.1,
        metadata={"help": "ORPO: weight of the odds-ratio term against the chosen reply's NLL (the paper's lambda)."},
    )
    simpo_beta: float = field(
        default=2.0, metadata={"help": "SimPO: scale of the length-averaged reward difference (the paper's beta)."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO: target reward margin (the paper's gamma)."})
    kto_beta: float = field(
        default=0.1, metadata={"help": "KTO: strength of the pull towards the reference model (trl's beta)."}
    )
    kto_loss_type: str = field(
        default="kto",
        metadata={"help": "KTO: kto (with the KL estimate), or apo_zero_unpaired (no KL term, no reference KL)."},
    )
    kto_desirable_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight of the desirable (label true) examples' losses."}
    )
    kto_undesirable_weight: float = field(
        default=1.0, metadata={"help": "KTO: weight of the undesirable (label false) examples' losses."}
    )
    rm_center_rewards_coefficient: Optional[float] = field(
        default=None,
        metadata={"help": "Reward model: weight of a penalty on the rewards' square, pulling them to mean 0 (0.01)."},
    )
    grpo_rewards: Optional[list[Any]] = field(
        default=None,
        metadata={
            "help": 'GRPO: the reward functions, each a name or an object: built-ins {"name": format|accuracy|'
            'length|json|tool_call, "weight": 1.0, options...}, or {"function": "module:name"} for your own '
            "(see component/tasks/rewards.py)."
        },
    )
    grpo_num_generations: int = field(
        default=4, metadata={"help": "GRPO: completions sampled per prompt (the group whose rewards are compared)."}
    )
    grpo_max_completion_length: int = field(default=64, metadata={"help": "GRPO: most new tokens per completion."})
    grpo_temperature: float = field(default=1.0, metadata={"help": "GRPO: sampling temperature of the completions."})
    grpo_beta: float = field(
        default=0.0,
        metadata={"help": "GRPO: weight of the KL penalty towards the starting model (0: none, no reference kept)."},
    )
    grpo_loss_type: str = field(
        default="dapo",
        metadata={"help": "GRPO: the loss's normalisation, as trl names it: grpo, dr_grpo, dapo, bnpo, ..."},
    )
    grpo_use_vllm: bool = field(
        default=False, metadata={"help": "GRPO: generate with vLLM (a GPU with vllm installed); off by default."}
    )
    grpo_samples_every: int = field(
        default=10,
        metadata={
            "help": "GRPO: write a few prompts with their completions and rewards to samples.jsonl every N steps."
        },
    )


OUR_CLASSES = (ModelArguments, DataArguments, MethodArguments)


# transformers is imported on first use, not with this module: it takes seconds, and `train.py --help`
# (our classes only) should not wait for it.
@functools.cache
def argument_classes() -> tuple[type, ...]:
    """Our classes and transformers' TrainingArguments: every field of each is a config key."""
    from transformers import TrainingArguments

    return (*OUR_CLASSES, TrainingArguments)


@functools.cache
def training_fields() -> frozenset[str]:
    """The keys that are TrainingArguments' (constructor) fields."""
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


@dataclass(frozen=True)
class Config:
    """A validated configuration: pure data, no process state."""

    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    training: dict[str, Any]
    """TrainingArguments keyword arguments: our defaults, then the file's and the flags' values."""
    source: str = ""
    argv: tuple[str, ...] = ()
    """The command-line arguments it was loaded from (file flag and overrides, as given), so that the
    resume hint repeats the overrides; empty for a config built from a dict."""

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]

    def to_dict(self, training_args: Optional[TrainingArguments] = None) -> dict[str, Any]:
        """Every value, secrets removed, ready to be saved as JSON: with the built TrainingArguments
        (component/training/setup.py) every resolved one, else those given or defaulted by us."""
        out: dict[str, Any] = {SOURCE_KEY: self.source}
        for part in (self.model, self.data, self.method):
            out.update(dataclasses.asdict(part))
        training = training_args.to_dict() if training_args is not None else dict(self.training)
        # TrainingArguments' fields only: a task's subclass (trl's DPOConfig) repeats our dpo_* keys and
        # would overwrite ours with its own names and defaults (its padding_free, say).
        out.update({k: v for k, v in training.items() if k in training_fields() and k not in SECRET_KEYS})
        return out
