"""Scale-out runs equal one process: torchrun DDP (one node and two), DeepSpeed ZeRO-2/3.

Every distributed run here is real: `python -m torch.distributed.run` (or the
`deepspeed` launcher) starts 2 CPU ranks that talk over gloo on 127.0.0.1.
The reference is one process at batch 4; the ranks each take batch 2, so every
optimizer step sees the same 4 examples (accelerate gives batch i of the same
seeded order to rank i % 2) and the gradients are averaged over the same
supervised tokens. So the per-step losses (trainer_state.json's log_history:
the Trainer logs the mean over ranks) and the final weights must agree within
float tolerance. A rank that trained on all the data instead of its half shows
up as a different loss at step 1.

Runs are grouped so that each launch pays its start-up once (tests/dist_worker.py
runs several configs in one launch); each group is a module-scoped fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from component.config import CONFIG_FILE_FLAG
from component.errors import USER_ERROR_EXIT_CODE
from component.training import distributed
from component.training.distributed import free_port
from component.training.setup import training_arguments
from tests.conftest import ROOT, base_config, write_config
from tests.runs import load_config, subprocess_env

WORKER = ROOT / "tests" / "dist_worker.py"
TRAIN_ARGS = ROOT / "train_args"
DS_CONFIGS = {
    "z2": TRAIN_ARGS / "ds_z2_config.json",
    "z3": TRAIN_ARGS / "ds_z3_config.json",
    "z3_offload": TRAIN_ARGS / "ds_z3_offload_config.json",
}
RANKS = 2
STEPS = 4  # 8 examples, 4 per step: two epochs, so the per-epoch reshuffle is covered too
PER_RANK_BATCH = 2
LEARNING_RATE = {"lora": 1e-2, "full": 1e-3}
LOSS_TOL = 2e-5
WEIGHT_TOL = 2e-5
LAUNCH_TIMEOUT_S = 900
# Keys every shipped DeepSpeed config must leave to the Trainer.
AUTO_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


# ---------------------------------------------------------------- helpers


def launch_env() -> dict:
    env = subprocess_env()  # as the single-process subprocess runs, minus any inherited rank variables
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def start(cmd: list[str]) -> subprocess.Popen:
    """Start a launcher; its output goes to a file (a full pipe would stall a rank and hang its peers)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.log = log
    return proc


def launch_one_node(cfgs: list[Path]) -> None:
    """One torchrun launch of RANKS ranks on loopback, running every config in turn."""
    port = free_port()
    cmd = torchrun(
        f"--nproc_per_node={RANKS}", "--master_addr=127.0.0.1", f"--master_port={port}", str(WORKER), *map(str, cfgs)
    )
    check_launch([start(cmd)])


def check_launch(procs: list[subprocess.Popen]) -> None:
    """Wait for every launcher; on a timeout end their process groups. Each must exit 0."""
    try:
        for p in procs:
            p.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:  # SIGTERM first: torchrun passes it on to its ranks
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    for p in procs:
        p.log.seek(0)
        out = p.log.read()
        p.log.close()
        assert p.returncode == 0, f"{' '.join(map(str, p.args[:8]))} ... exited {p.returncode}:\n{out[-6000:]}"


def make_config(tmp: Path, model_dir: Path, name: str, mode: str, batch: int, **extra) -> Path:
    values = base_config(
        model_dir,
        tmp / name,
        train_mode=mode,
        per_device_train_batch_size=batch,
        learning_rate=LEARNING_RATE[mode],
        max_steps=STEPS,
        save_steps=STEPS,
        max_prompt_length=64,
        **extra,
    )
    return write_config(tmp / f"{name}.json", **values)


def step_losses(out: Path) -> list[float]:
    """Per-step training losses, from the Trainer's own state in the last checkpoint."""
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    return [losses[s] for s in sorted(losses)]


def epochs(out: Path) -> list[float]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [h["epoch"] for h in state["log_history"] if "loss" in h]


def weights(out: Path, mode: str) -> dict[str, torch.Tensor]:
    tensors = load_file(out / ("adapter_model.safetensors" if mode == "lora" else "model.safetensors"))
    assert tensors, f"{out}: no tensors saved"
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    assert not empty, f"{out}: empty tensors saved: {empty[:5]}"
    return tensors


def assert_same_training(run: Path, reference: Path, mode: str) -> None:
    got, want = step_losses(run), step_losses(reference)
    assert got == pytest.approx(want, abs=LOSS_TOL), f"per-step losses {got} != single process {want}"
    assert epochs(run) == epochs(reference)  # each rank saw half the data: same steps per epoch
    a, b = weights(run, mode), weights(reference, mode)
    assert set(a) == set(b)
    for key in b:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_TOL, rtol=0, msg=f"{run}: {key}")


def assert_reloads(out: Path, mode: str, base_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    if mode == "full":
        model = AutoModelForCausalLM.from_pretrained(out)
        saved = weights(out, mode)
        key = next(k for k in saved if k.endswith("q_proj.weight"))
        torch.testing.assert_close(model.state_dict()[key], saved[key])
        return
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded and all(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)


def assert_logged_once(out: Path) -> None:
    """Only rank 0 writes train.log: each step's line is there exactly once."""
    text = (out / "train.log").read_text()
    for step in range(1, STEPS + 1):
        assert text.count(f"step {step}: loss=") == 1, text[-3000:]


# ---------------------------------------------------------------- runs (module-scoped)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single(work, tiny_llama_dir) -> dict[str, Path]:
    """The references: one process, batch 4, in-process (no launcher)."""
    outs = {}
    for mode in ("lora", "full"):
        cfg = make_config(work, tiny_llama_dir, f"single_{mode}", mode, RANKS * PER_RANK_BATCH)
        assert train.main([CONFIG_FILE_FLAG, str(cfg)]) == 0
        outs[mode] = work / f"single_{mode}"
    return outs


@pytest.fixture(scope="module")
def ddp(work, tiny_llama_dir) -> dict[str, Path]:
    """torchrun, one node, 2 ranks: full then LoRA in one launch.

    LoRA runs with reentrant gradient checkpointing: DDP's unused-parameter
    search (transformers' default for a peft model) fails there ("Expected to
    mark a variable ready only once"), so this also proves our default.
    """
    cfgs = [
        make_config(work, tiny_llama_dir, "ddp_full", "full", PER_RANK_BATCH),
        make_config(
            work,
            tiny_llama_dir,
            "ddp_lora",
            "lora",
            PER_RANK_BATCH,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        ),
    ]
    launch_one_node(cfgs)
    return {m: work / f"ddp_{m}" for m in ("full", "lora")}


@pytest.fixture(scope="module")
def multinode(work, tiny_llama_dir) -> dict[str, Path]:
    """Two torchrun "nodes" of one rank each, rendezvous through c10d on 127.0.0.1."""
    cfgs = [make_config(work, tiny_llama_dir, f"nodes_{m}", m, PER_RANK_BATCH) for m in ("full", "lora")]
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [
        start(
            torchrun(
                f"--nnodes={RANKS}",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={endpoint}",
                "--rdzv_id=test-multinode",
                str(WORKER),
                *map(str, cfgs),
            )
        )
        for node in range(RANKS)
    ]
    check_launch(procs)
    return {m: work / f"nodes_{m}" for m in ("full", "lora")}


DS_RUNS = [("z2", "lora"), ("z2", "full"), ("z3", "lora"), ("z3", "full")]


@pytest.fixture(scope="module")
def deepspeed_runs(work, tiny_llama_dir) -> dict[tuple[str, str], Path]:
    """torchrun with `deepspeed` in the config, 2 CPU ranks: ZeRO-2 and ZeRO-3, LoRA and full, one launch."""
    cfgs = [
        make_config(work, tiny_llama_dir, f"ds_{z}_{m}", m, PER_RANK_BATCH, deepspeed=str(DS_CONFIGS[z]))
        for z, m in DS_RUNS
    ]
    launch_one_node(cfgs)
    return {(z, m): work / f"ds_{z}_{m}" for z, m in DS_RUNS}


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_torchrun_ddp_matches_one_process(ddp, single, mode):
    assert_same_training(ddp[mode], single[mode], mode)
    # ...with the lean loss, our default, on both sides: it survives DDP's wrapping and gradient averaging.
    for run in (ddp[mode], single[mode]):
        assert "loss: lean" in (run / "train.log").read_text(), run


def test_the_tokenized_data_is_cached_once_for_every_rank_and_run(ddp, single, work):
    """Every run here tokenizes the same data: one cache entry, built by the first rank of the first
    run inside main_process_first, loaded by the others; no temporary folder left behind."""
    assert sorted(p.name.split("-")[0] for p in (work / "data_cache").iterdir()) == ["sft"]
    summaries = {(run / "data_summary.json").read_text() for run in (*ddp.values(), *single.values())}
    assert len(summaries) == 1


def test_torchrun_only_rank0_writes_the_log(ddp):
    assert_logged_once(ddp["lora"])  # the launch's last run: no earlier run's log handler in its file


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_nodes_match_one_process(multinode, single, mode):
    assert_same_training(multinode[mode], single[mode], mode)


@pytest.mark.parametrize("stage,mode", DS_RUNS)
def test_deepspeed_matches_one_process(deepspeed_runs, single, stage, mode):
    # Equal step-1 loss proves the data is split: with the same batches on both
    # ranks (accelerate's default DeepSpeed state on the CPU) it differs.
    assert_same_training(deepspeed_runs[(stage, mode)], single[mode], mode)


@pytest.mark.parametrize("stage,mode", DS_RUNS)
def test_deepspeed_saved_weights_reload(deepspeed_runs, tiny_llama_dir, stage, mode):
    assert_reloads(deepspeed_runs[(stage, mode)], mode, tiny_llama_dir)


def test_deepspeed_launcher_matches_one_process(work, tiny_llama_dir, single):
    """`deepspeed --num_gpus 2 train.py ...` runs on a CPU machine too (DeepSpeed's CPU accelerator)."""
    cfg = make_config(work, tiny_llama_dir, "launcher_lora", "lora", PER_RANK_BATCH, deepspeed=str(DS_CONFIGS["z2"]))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    check_launch(
        [
            start(
                [
                    launcher,
                    f"--num_gpus={RANKS}",
                    "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}",
                    "train.py",
                    CONFIG_FILE_FLAG,
                    str(cfg),
                ]
            )
        ]
    )
    assert_same_training(work / "launcher_lora", single["lora"], "lora")
    assert_logged_once(work / "launcher_lora")


def test_deepspeed_without_a_launcher_runs_as_one_rank(work, tiny_llama_dir, single):
    """`python train.py` with `deepspeed` set: one rank (DeepSpeed alone would look for MPI)."""
    cfg = make_config(
        work, tiny_llama_dir, "ds_plain_lora", "lora", RANKS * PER_RANK_BATCH, deepspeed=str(DS_CONFIGS["z3"])
    )
    check_launch([start([sys.executable, "train.py", CONFIG_FILE_FLAG, str(cfg)])])
    assert_same_training(work / "ds_plain_lora", single["lora"], "lora")


@pytest.mark.slow
def test_deepspeed_zero3_offload_matches_one_process(work, tiny_llama_dir, single):
    """CPU offload uses DeepSpeed's own AdamW (DeepSpeedCPUAdam): its op compiles on first use."""
    cfg = make_config(
        work, tiny_llama_dir, "ds_offload_lora", "lora", PER_RANK_BATCH, deepspeed=str(DS_CONFIGS["z3_offload"])
    )
    check_launch(
        [
            start(
                torchrun(
                    f"--nproc_per_node={RANKS}",
                    "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}",
                    "train.py",
                    CONFIG_FILE_FLAG,
                    str(cfg),
                )
            )
        ]
    )
    assert_same_training(work / "ds_offload_lora", single["lora"], "lora")


# ---------------------------------------------------------------- setup and checks (no launch)


def test_backend_is_gloo_on_cpu_nccl_on_gpu_and_configurable():
    assert distributed.choose_backend(None, gpu=False) == "gloo"
    assert distributed.choose_backend(None, gpu=True) == "nccl"
    assert distributed.choose_backend("mpi", gpu=False) == "mpi"


SHUTDOWN_PROBE = """
import sys
import torch.distributed as dist
from component.training.distributed import shutdown
shutdown(0)  # no group: returns
print("returned without a group", flush=True)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
print("buffered, not yet flushed")
shutdown(int(sys.argv[1]))
print("not reached")
"""


@pytest.mark.parametrize("status", [0, 3])
def test_shutdown_ends_a_launched_rank_without_teardown(status):
    """A rank with a process group exits at once with its status, output flushed (no gloo teardown to abort)."""
    code = SHUTDOWN_PROBE % free_port()
    out = subprocess.run(
        [sys.executable, "-c", code, str(status)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=120,
    )
    assert out.returncode == status, out.stderr[-3000:]
    assert "returned without a group" in out.stdout and "buffered, not yet flushed" in out.stdout
    assert "not reached" not in out.stdout


def test_one_process_keeps_training_arguments(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    kwargs = {"output_dir": "x", "use_cpu": False}
    assert distributed.prepare_training_kwargs(kwargs, "full") == kwargs
    assert distributed.prepare_training_kwargs(kwargs, "lora") == {**kwargs, "ddp_find_unused_parameters": False}


def test_torchrun_on_cpu_sets_gloo_and_cpu_process_group(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "has_gpu", lambda: False)
    out = distributed.prepare_training_kwargs({"output_dir": "x"}, "full")
    assert out["use_cpu"] is True and out["ddp_backend"] == "gloo"
    out = distributed.prepare_training_kwargs({"ddp_backend": "mpi", "ddp_find_unused_parameters": True}, "qlora")
    assert out["ddp_backend"] == "mpi" and out["ddp_find_unused_parameters"] is True  # the user's values win


def test_plain_python_with_deepspeed_gets_a_one_rank_environment(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    assert not distributed.emulate_launch_for_deepspeed(None)
    assert os.environ == {}
    assert distributed.emulate_launch_for_deepspeed("ds.json")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert not distributed.emulate_launch_for_deepspeed("ds.json")  # launched (or already set): left alone


@pytest.mark.parametrize("mode,expected", [("lora", False), ("full", None)])
def test_find_unused_parameters_resolved(tmp_path, tiny_llama_dir, mode, expected):
    cfg = write_config(
        tmp_path / "c.json", **base_config(tiny_llama_dir, tmp_path / "out", train_mode=mode, max_prompt_length=64)
    )
    assert training_arguments(load_config([CONFIG_FILE_FLAG, str(cfg)])).ddp_find_unused_parameters is expected


@pytest.mark.parametrize("name", sorted(DS_CONFIGS))
def test_shipped_deepspeed_configs(name, tmp_path, tiny_llama_dir):
    ds = json.loads(DS_CONFIGS[name].read_text())
    for key in AUTO_KEYS:
        assert ds[key] == "auto", key
    assert ds["fp16"]["enabled"] == ds["bf16"]["enabled"] == "auto"
    assert "scheduler" not in ds  # lr_scheduler_type stays in charge
    zero = ds["zero_optimization"]
    assert zero["stage"] == (2 if name == "z2" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if "optimizer" in ds:
        assert all(v == "auto" for v in ds["optimizer"]["params"].values())
    cfg = write_config(
        tmp_path / "c.json",
        **base_config(tiny_llama_dir, tmp_path / "out", max_prompt_length=64, deepspeed=str(DS_CONFIGS[name])),
    )
    load_config([CONFIG_FILE_FLAG, str(cfg)])


def _ds_file(tmp_path: Path, **blocks) -> str:
    ds = {**json.loads(DS_CONFIGS["z2"].read_text()), **blocks}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


def test_deepspeed_scheduler_block_is_refused_before_output_dir(tmp_path, tiny_llama_dir):
    ds = _ds_file(tmp_path, scheduler={"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto"}})
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.json",
        **base_config(tiny_llama_dir, out, max_prompt_length=64, deepspeed=ds, lr_scheduler_type="cosine"),
    )
    assert train.main([CONFIG_FILE_FLAG, str(cfg)]) == USER_ERROR_EXIT_CODE
    assert not out.exists()
    problems = distributed.deepspeed_problems({"deepspeed": ds, "lr_scheduler_type": "cosine"})
    assert len(problems) == 1 and "'scheduler'" in problems[0] and "'cosine'" in problems[0]


def test_deepspeed_optimizer_that_replaces_optim_is_refused(tmp_path):
    ds = _ds_file(tmp_path, optimizer={"type": "SGD", "params": {"lr": "auto"}})
    problems = distributed.deepspeed_problems({"deepspeed": ds, "optim": "adamw_torch"})
    assert len(problems) == 1 and "'SGD'" in problems[0] and "'adamw_torch'" in problems[0]
    ds = _ds_file(tmp_path, optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    assert distributed.deepspeed_problems({"deepspeed": ds, "optim": "adamw_torch"}) == []
    assert distributed.deepspeed_problems({"deepspeed": ds, "optim": "adafactor"})


def test_zero3_full_without_gathered_save_is_refused(tmp_path):
    ds = json.loads(DS_CONFIGS["z3"].read_text())
    ds["zero_optimization"][distributed.GATHER_ON_SAVE] = False
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    problems = distributed.deepspeed_problems({"deepspeed": str(tmp_path / "z3.json"), "train_mode": "full"})
    assert len(problems) == 1 and distributed.GATHER_ON_SAVE in problems[0]
    # LoRA saves only the adapter, which the Trainer gathers under ZeRO-3 either way.
    assert distributed.deepspeed_problems({"deepspeed": str(tmp_path / "z3.json"), "train_mode": "lora"}) == []


def test_zero3_with_qlora_is_refused_with_reason():
    problems = distributed.deepspeed_problems({"deepspeed": str(DS_CONFIGS["z3"]), "train_mode": "qlora"})
    assert len(problems) == 1 and "ZeRO-3" in problems[0] and "qlora" in problems[0]
    assert distributed.deepspeed_problems({"deepspeed": str(DS_CONFIGS["z2"]), "train_mode": "qlora"}) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed's CPU-only precision limits")
def test_deepspeed_fp16_on_cpu_is_refused():
    problems = distributed.deepspeed_problems({"deepspeed": str(DS_CONFIGS["z2"]), "fp16": True})
    assert len(problems) == 1 and "'fp16'" in problems[0]
    assert distributed.deepspeed_problems({"deepspeed": str(DS_CONFIGS["z2"]), "bf16": True}) == []


def test_torchrun_dora_and_token_batches_match_one_process(work, tiny_llama_dir):
    """DoRA (a magnitude vector per output, all-reduced like any LoRA weight) under DDP equals one
    process; token-budget batches too: accelerate deals the micro-batches round-robin to the ranks,
    so one process with twice the accumulation steps sees the same batches per optimizer step."""
    ddp = make_config(work, tiny_llama_dir, "ddp_dora", "lora", PER_RANK_BATCH, lora_variant="dora")
    tokens = dict(batching="tokens", max_tokens_per_batch=128)
    ddp_tokens = make_config(work, tiny_llama_dir, "ddp_tokens", "lora", PER_RANK_BATCH, **tokens)
    launch_one_node([ddp, ddp_tokens])
    one = make_config(work, tiny_llama_dir, "single_dora", "lora", RANKS * PER_RANK_BATCH, lora_variant="dora")
    assert train.main([CONFIG_FILE_FLAG, str(one)]) == 0
    assert_same_training(work / "ddp_dora", work / "single_dora", "lora")
    one_tokens = make_config(
        work, tiny_llama_dir, "single_tokens", "lora", PER_RANK_BATCH, gradient_accumulation_steps=RANKS, **tokens
    )
    assert train.main([CONFIG_FILE_FLAG, str(one_tokens)]) == 0
    assert step_losses(work / "ddp_tokens") == pytest.approx(step_losses(work / "single_tokens"), abs=LOSS_TOL)
