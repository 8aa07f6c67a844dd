"""bf16 against fp32 on the CPU, for the demo config: where a step's time goes, and tokens/s and loss.

    python bench/cpu_bf16.py matmul                       # bf16 vs fp32 GFLOP/s of one square matmul
    python bench/cpu_bf16.py profile                      # top ops by self CPU time, one fp32 and one bf16 run
    python bench/cpu_bf16.py compare                      # tokens/s and loss curves: fp32 vs bf16, 30 steps, 3 repeats
    python bench/cpu_bf16.py compare --configs fp32,bf16,bf16_ckpt --steps 12 --repeats 1
    python bench/cpu_bf16.py compare --configs fp32,bf16,fp32@base,bf16@base --baseline /tmp/base   # before/after

Every run is `train.py` on `train_args/smollm2-135m-sft-lora.json` (the demo: SmolLM2-135M-Instruct
from the GGUF, LoRA r16 all-linear, batch 4, max length 512) with `--bf16` set per configuration
and nothing saved, each in its own process. `compare` alternates the configurations (the order
rotates each repeat) and reports medians: real tokens/s over steps 2..N, each one's ratio to fp32,
peak RSS, and the per-step loss curves with their largest relative difference from fp32's.
`profile` runs a few warm-up steps, then profiles whole steps (forward, backward, optimizer) with
torch.profiler and prints the ops with the most self CPU time, and a summary by kind of op.
Nothing is written into the repository. Not timed in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "train_args" / "smollm2-135m-sft-lora.json"
CONFIGS = {
    "fp32": {"bf16": False},
    "bf16": {"bf16": True},
    "bf16_bf16_lora_output": {"bf16": True, "lora_fp32_output": False},
    "fp32_ckpt": {"bf16": False, "activation_checkpointing": True},
    "bf16_ckpt": {"bf16": True, "activation_checkpointing": True},
}
"""Named configurations: flags given to train.py on top of the demo config (and of --set)."""
BASELINE_SUFFIX = "@base"
"""`fp32@base`: the configuration run on the code in --baseline (an unpacked older commit) instead of this checkout."""
# Kind of op -> op names (without "aten::", a trailing "_" or "_backward"), for the profile's summary; the rest is "other".
KINDS = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm"),
    "attention": ("_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention"),
    "dropout masks": ("bernoulli", "random", "ge", "where", "native_dropout", "dropout"),
    "dtype casts and copies": ("copy", "_to_copy", "to", "clone", "contiguous", "cat"),
    "optimizer": ("_fused_adamw", "_fused_adam"),
    "elementwise and reductions": (
        "mul",
        "add",
        "sub",
        "div",
        "neg",
        "silu",
        "sigmoid",
        "pow",
        "rsqrt",
        "mean",
        "sum",
        "exp",
        "log",
        "amax",
        "maximum",
        "fill",
        "zero",
        "scatter_add",
        "index",
        "gather",
        "embedding",
    ),
}


# ---------------------------------------------------------------- workers (one training run each)


def train_argv(overrides: dict, out: str, steps: int) -> list[str]:
    values = {
        "output_dir": out,
        "overwrite_output_dir": True,
        "max_steps": steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        **overrides,
    }
    argv = ["--train_args_file", str(DEMO_CONFIG)]
    for key, value in values.items():
        argv += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return argv


def recorder():
    """A callback: the time at each step's end, and each step's loss and cumulative real tokens."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.losses: dict[int, float] = {}
            self.tokens: dict[int, int] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])
                self.tokens[state.global_step] = int(logs.get("real_tokens_seen", 0))

    return Recorder()


def profiler_callback(warmup: int, steps: int):
    """A callback that profiles steps warmup+1 .. warmup+steps (whole steps: forward, backward, optimizer)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.started = 0.0
            self.seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.prof.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + steps:
                self.seconds = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)

    return Profile()


def run_train(overrides: dict, steps: int, callbacks) -> None:
    from component.cli import main_train

    with tempfile.TemporaryDirectory() as out:
        status = main_train(train_argv(overrides, out, steps), callbacks=callbacks)
    if status:
        raise SystemExit(status)


def worker_compare(overrides: dict, steps: int) -> dict:
    rec = recorder()
    run_train(overrides, steps, [rec])
    first, last = min(rec.tokens), max(rec.tokens)
    elapsed = rec.ends[-1] - rec.ends[0]
    return {
        "steps": len(rec.ends),
        "timed_s": elapsed,
        "real_tokens_per_s": (rec.tokens[last] - rec.tokens[first]) / elapsed,
        "losses": [rec.losses[s] for s in sorted(rec.losses)],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def kind_of(op: str) -> str:
    name = op.removeprefix("aten::").removesuffix("_backward").removesuffix("_")
    return next((kind for kind, names in KINDS.items() if name in names), "other")


def worker_profile(overrides: dict, warmup: int, steps: int, rows: int) -> dict:
    prof = profiler_callback(warmup, steps)
    run_train(overrides, warmup + steps, [prof])
    events = prof.prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
    shaped = prof.prof.key_averages(group_by_input_shape=True)
    print(shaped.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40), flush=True)
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]
    return {
        "seconds_per_step": prof.seconds / steps,
        "self_s_per_step_by_kind": {k: round(v / steps, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops": [[e.key, round(e.self_cpu_time_total / 1e6 / steps, 3), e.count // steps] for e in top],
    }


# ---------------------------------------------------------------- the matmul reference


def matmul_gflops(size: int, repeats: int) -> dict:
    import torch

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        out[str(dtype).removeprefix("torch.")] = round(2 * size**3 / statistics.median(times) / 1e9, 1)
    return out


# ---------------------------------------------------------------- orchestration


def spawn(args: list[str], timeout: int, code: str | None = None) -> dict:
    """One worker process; `code`: a folder whose `component` package it imports instead of this checkout's."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if code:
        env["PYTHONPATH"] = str(Path(code).resolve())
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=timeout,
    )
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker {args[:2]} failed (exit {proc.returncode})")
    printed = "\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT "))
    return {**json.loads(results[-1][len("RESULT ") :]), "printed": printed}


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def overrides_for(name: str, extra: dict) -> dict:
    return {**CONFIGS[name.removesuffix(BASELINE_SUFFIX)], **extra}


def compare(args: argparse.Namespace, extra: dict) -> dict:
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            before = load()
            code = args.baseline if name.endswith(BASELINE_SUFFIX) else None
            result = spawn(
                ["compare", name, json.dumps(overrides_for(name, extra)), str(args.steps)], args.timeout, code
            )
            result.pop("printed")
            runs[name].append({**result, "load_before": before})
            print(f"# run {rep + 1} {name} ({before}): {json.dumps(result)}", file=sys.stderr, flush=True)
    return summarize(runs, names[0])


def median_curve(runs: list[dict]) -> list[float]:
    return [statistics.median(step) for step in zip(*(r["losses"] for r in runs), strict=True)]


def summarize(runs: dict[str, list[dict]], base: str) -> dict:
    base_tps = statistics.median(r["real_tokens_per_s"] for r in runs[base])
    base_curve = median_curve(runs[base])
    out = {}
    print(
        f"| configuration | real tokens/s (median) | runs | over {base} | peak RSS (MB) | max rel. loss diff vs {base} |"
    )
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        tps = statistics.median(r["real_tokens_per_s"] for r in rs)
        curve = median_curve(rs)
        diff = max(abs(a - b) / abs(b) for a, b in zip(curve, base_curve, strict=True))
        rss = statistics.median(r["peak_rss_mb"] for r in rs)
        each = ", ".join(f"{r['real_tokens_per_s']:.0f}" for r in rs)
        print(f"| {name} | {tps:.0f} | {each} | {tps / base_tps:.3f} | {rss:.0f} | {diff:.4f} |")
        out[name] = {
            "tokens_per_s": round(tps, 1),
            "ratio": round(tps / base_tps, 3),
            "peak_rss_mb": round(rss),
            "max_rel_loss_diff": round(diff, 5),
            "loss_curve": [round(x, 4) for x in curve],
        }
    for name in runs:
        print(f"{name} losses: " + " ".join(f"{x:.4f}" for x in out[name]["loss_curve"]))
    return out


def profile(args: argparse.Namespace, extra: dict) -> dict:
    out = {}
    for name in args.configs.split(","):
        before = load()
        result = spawn(
            ["profile", name, json.dumps(overrides_for(name, extra)), str(args.warmup), str(args.steps), "30"],
            args.timeout,
        )
        print(f"## {name} ({before}): {result['seconds_per_step']:.2f} s/step\n{result.pop('printed')}\n")
        print(f"{name} self time per step by kind (s): {json.dumps(result['self_s_per_step_by_kind'])}\n")
        out[name] = result
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("compare", "profile", "matmul"))
    p.add_argument("--configs", default=None, help=f"comma-separated, from {', '.join(CONFIGS)}; the first is the base")
    p.add_argument("--set", action="append", default=[], help="key=value (JSON value) for every configuration")
    p.add_argument("--steps", type=int, default=None, help="compare: steps per run (30); profile: steps profiled (2)")
    p.add_argument("--warmup", type=int, default=3, help="profile: steps before profiling")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=2048, help="matmul: the square matrices' side")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    p.add_argument(
        "--baseline",
        default=None,
        help="a folder holding an older commit's files (git archive COMMIT | tar -x -C DIR): configurations "
        f"named NAME{BASELINE_SUFFIX} import its `component` package",
    )
    return p.parse_args(argv)


def json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--worker":
        mode, _name, overrides, *numbers = argv[1:]
        numbers = [int(x) for x in numbers]
        fn = worker_compare if mode == "compare" else worker_profile
        print("RESULT " + json.dumps(fn(json.loads(overrides), *numbers)), flush=True)
        return 0
    args = parse(argv)
    extra = {k: json_or_text(v) for k, _, v in (s.partition("=") for s in args.set)}
    print(f"# {load()}, torch threads from OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if args.mode == "matmul":
        result = matmul_gflops(args.size, args.repeats * 3)
    elif args.mode == "profile":
        args.configs, args.steps = args.configs or "fp32,bf16", args.steps or 2
        result = profile(args, extra)
    else:
        args.configs, args.steps = args.configs or "fp32,bf16", args.steps or 30
        result = compare(args, extra)
    print(f"# {load()}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
