"""FSDP2 (`fsdp` + `fsdp_config`, through accelerate) equals one process, shards, checkpoints and resumes.

Every distributed run is real: `python -m torch.distributed.run` starts 2 CPU ranks over gloo on
127.0.0.1 and tests/dist_worker.py runs several configs per launch. As in tests/test_distributed.py the
reference is one process at batch 4 and each rank takes batch 2, so every optimizer step sees the same
examples; per-step losses and gradient norms (trainer_state.json) agree within 1e-5 relative and the
final weights within 1e-5, with our defaults on both sides (the lean loss, padding-free batches).

What these versions do (torch 2.13, transformers 5.24, accelerate 1.15), found for issue 21:
- Without our help, FSDP on the CPU is DDP: accelerate's `AcceleratorState` switches to FSDP only on a
  GPU-like process group and drops the plugin on a gloo CPU group (no error; the DDP reducer's
  find_unused_parameters warning is all one sees). component/training/fsdp.py sets the state as
  accelerate does on a GPU; `test_fsdp_on_the_cpu_is_our_doing` fails when accelerate does it itself.
- PyTorch's `fully_shard` then runs on the CPU over gloo: full fine-tuning, LoRA (frozen base and
  trainable adapters in one FSDP unit), a tied head, FSDP's activation checkpointing and transformers',
  `cpu_ram_efficient_loading`, sharded checkpoints (torch.distributed.checkpoint) and their resumption.
- The lean loss crashed (SIGSEGV in the final norm's backward) until it learnt that an FSDP head is a
  plain linear head (component/training/loss.py): calling the head module a second time let FSDP free
  the norm's gathered weight before the norm's backward.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from component.config import CONFIG_FILE_FLAG
from component.data.collator import PaddingFreeCollator
from component.errors import USER_ERROR_EXIT_CODE
from component.training import distributed, fsdp
from component.training.checkpoints import checkpoint_problems
from tests.conftest import ROOT, base_config, write_config
from tests.runs import load_config, load_values
from tests.test_distributed import assert_reloads, check_launch, launch_env, torchrun

WORKER = ROOT / "tests" / "dist_worker.py"
SHIPPED = ROOT / "train_args" / "llama3-8b-sft-full-fsdp2.json"
RANKS = 2
PER_RANK_BATCH = 2
STEPS = 4  # 8 examples, 4 per step: two epochs
SAVE_STEPS = 2
KILL_AT = 3  # rank 1 dies as step 3 begins: checkpoint-2 (sharded) is the newest
LEARNING_RATE = {"lora": 1e-2, "full": 1e-3}
REL_TOL = 1e-5
WEIGHT_TOL = 1e-5
SHARDED = {"fsdp_version": 2, "fsdp_state_dict_type": fsdp.SHARDED_STATE_DICT}
# name -> (model, train_mode, extra keys); one launch runs them all, the DDP control first.
RUNS = {
    "ddp_control": ("llama", "full", {}),
    "fsdp_full": ("llama", "full", {"fsdp": "full_shard", "fsdp_config": SHARDED}),
    "fsdp_lora": ("llama", "lora", {"fsdp": "full_shard", "fsdp_config": SHARDED}),
    "fsdp_tied": ("tied", "full", {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}),
    "fsdp_dora": ("llama", "lora", {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}, "lora_variant": "dora"}),
    "fsdp_full_fsdp_ac": (
        "llama",
        "full",
        {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "fsdp_activation_checkpointing": True}},
    ),
    "fsdp_lora_hf_ac": (
        "llama",
        "lora",
        {"fsdp": True, "fsdp_config": {"fsdp_version": 2}, "activation_checkpointing": True},
    ),
    "fsdp_full_ram_efficient": (
        "llama",
        "full",
        {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "fsdp_cpu_ram_efficient_loading": True}},
    ),
}
FSDP_RUNS = [name for name in RUNS if name.startswith("fsdp_")]
REFERENCE = {"fsdp_tied": "single_tied", "fsdp_dora": "single_dora"}  # else single_<mode>
TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


# ---------------------------------------------------------------- helpers


def run_config(work: Path, models: dict[str, Path], name: str, model: str, mode: str, batch: int, **extra) -> Path:
    values = base_config(
        models[model],
        work / name,
        train_mode=mode,
        per_device_train_batch_size=batch,
        learning_rate=LEARNING_RATE[mode],
        max_steps=STEPS,
        save_steps=SAVE_STEPS,
        max_prompt_length=64,
        **extra,
    )
    return write_config(work / f"{name}.json", **values)


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    """A launcher with its output in a file (a full pipe would stall a rank and hang its peers)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**launch_env(), **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.log = log
    return proc


def launch(cfgs: list[Path], **env: str) -> subprocess.Popen:
    cmd = torchrun(
        f"--nproc_per_node={RANKS}",
        "--master_addr=127.0.0.1",
        f"--master_port={distributed.free_port()}",
        str(WORKER),
        *map(str, cfgs),
    )
    return start(cmd, **env)


def history(out: Path) -> list[dict]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1)), steps
    return steps


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (out / name).is_file():
            return load_file(out / name)
    raise AssertionError(f"no weights in {out}: {sorted(p.name for p in out.iterdir())}")


def assert_close_rel(got: float, want: float, what: str) -> None:
    assert abs(got - want) <= REL_TOL * abs(want), f"{what}: {got} != {want} (rel {abs(got - want) / abs(want):.2e})"


def assert_same_training(run: Path, reference: Path, first_step: int = 1) -> None:
    """Per-step losses and gradient norms within 1e-5 relative from `first_step`, final weights within 1e-5."""
    for got, want in zip(history(run), history(reference), strict=True):
        if got["step"] >= first_step:
            assert_close_rel(got["loss"], want["loss"], f"{run.name} step {got['step']} loss")
            assert_close_rel(got["grad_norm"], want["grad_norm"], f"{run.name} step {got['step']} grad_norm")
            assert got["epoch"] == want["epoch"]  # each rank saw half the data
    a, b = final_weights(run), final_weights(reference)
    if TIED_HEAD in a.keys() - b.keys():
        # The gathered state dict holds the tied head under both names (one process saves it once);
        # the same tensor, and from_pretrained ties it again.
        torch.testing.assert_close(a.pop(TIED_HEAD), a[TIED_EMBEDDING], atol=0, rtol=0)
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].shape == b[key].shape, key  # consolidated: the full tensor, not a shard
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_TOL, rtol=0, msg=f"{run.name}: {key}")


# ---------------------------------------------------------------- runs (module-scoped)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """The tiny Llama, and the same shape with its head tied to the input embedding."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import tiny_config, tiny_tokenizer

    tied = tmp_path_factory.mktemp("tiny-llama-tied")
    tok = tiny_tokenizer()
    config = tiny_config("llama", len(tok))
    config.tie_word_embeddings = True
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    tok.save_pretrained(tied)
    return {"llama": tiny_llama_dir, "tied": tied}


@pytest.fixture(scope="module")
def single(work, models) -> dict[str, Path]:
    """The references: one process at batch 4, in-process (no launcher, no FSDP)."""
    references = {
        "single_full": ("llama", "full", {}),
        "single_lora": ("llama", "lora", {}),
        "single_tied": ("tied", "full", {}),
        "single_dora": ("llama", "lora", {"lora_variant": "dora"}),
    }
    for name, (model, mode, extra) in references.items():
        cfg = run_config(work, models, name, model, mode, RANKS * PER_RANK_BATCH, **extra)
        assert train.main([CONFIG_FILE_FLAG, str(cfg)]) == 0
    return {name: work / name for name in references}


@pytest.fixture(scope="module")
def runs(work, models) -> dict[str, Path]:
    """One torchrun launch, 2 ranks: the DDP control, then every FSDP configuration."""
    cfgs = [
        run_config(work, models, name, model, mode, PER_RANK_BATCH, **extra)
        for name, (model, mode, extra) in RUNS.items()
    ]
    check_launch([launch(cfgs, DIST_WORKER_SHARDING="1")])
    return {name: work / name for name in RUNS}


def reference_for(name: str, single: dict[str, Path]) -> Path:
    return single[REFERENCE.get(name, f"single_{RUNS[name][1]}")]


# ---------------------------------------------------------------- sharded, not DDP


def test_parameters_are_sharded_and_no_ddp_wrapper_exists(runs):
    for name in FSDP_RUNS:
        report = json.loads((runs[name] / "sharding.json").read_text())
        assert report["model"].startswith("FSDP") and report["world_size"] == RANKS, (name, report["model"])
        assert not report["ddp"], f"{name}: a DistributedDataParallel wrapper exists"
        for param, info in report["params"].items():
            assert info["type"] == "DTensor", (name, param, info)
            assert info["local"] < info["full"], (name, param, info)  # this rank holds a shard, not the whole
    control = json.loads((runs["ddp_control"] / "sharding.json").read_text())  # the probe can tell DDP apart
    assert control["ddp"] and {info["type"] for info in control["params"].values()} == {"Parameter"}


def test_fsdp_on_the_cpu_is_our_doing(runs):
    """accelerate 1.15 drops FSDP on a CPU process group; when it stops doing so, enable_on_cpu is
    not needed any more (and this test says so)."""
    for name in FSDP_RUNS:
        log = (runs[name] / "train.log").read_text()
        assert log.count(fsdp.CPU_FSDP_NOTE) == 1, name
        assert "find_unused_parameters" not in log


# ---------------------------------------------------------------- equal to one process


@pytest.mark.parametrize("name", FSDP_RUNS)
def test_fsdp_matches_one_process(runs, single, name):
    assert_same_training(runs[name], reference_for(name, single))
    # Our defaults, under FSDP too: the lean loss and padding-free batches.
    assert "loss: lean" in (runs[name] / "train.log").read_text()
    assert json.loads((runs[name] / "sharding.json").read_text())["collator"] == PaddingFreeCollator.__name__


def test_consolidated_outputs_load_with_plain_from_pretrained(runs, models):
    from transformers import AutoModelForCausalLM

    assert_reloads(runs["fsdp_full"], "full", models["llama"])
    assert_reloads(runs["fsdp_lora"], "lora", models["llama"])
    tied = AutoModelForCausalLM.from_pretrained(runs["fsdp_tied"])
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert not list(runs["fsdp_full"].glob("pytorch_model_fsdp*"))  # the final save is not sharded


def test_merge_reads_the_fsdp_adapter(runs, single, tmp_path):
    from transformers import AutoModelForCausalLM

    from script import merge_lora

    merged = {}
    for key, adapter in (("fsdp", runs["fsdp_lora"]), ("single", single["single_lora"])):
        out = tmp_path / key
        assert merge_lora.main(["--adapter_dir", str(adapter), "--output_dir", str(out), "--dtype", "fp32"]) == 0
        merged[key] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for key, want in merged["single"].items():
        torch.testing.assert_close(merged["fsdp"][key], want, atol=WEIGHT_TOL, rtol=0, msg=key)


def test_gguf_export_reads_the_fsdp_model(runs, tmp_path):
    """The consolidated full model exports to GGUF (f32) with the logits it trained to."""
    from transformers import AutoModelForCausalLM

    from script import export_gguf

    out = tmp_path / "fsdp.gguf"
    assert export_gguf.main(["--model", str(runs["fsdp_full"]), "--output", str(out), "--dtype", "f32"]) == 0
    trained = AutoModelForCausalLM.from_pretrained(runs["fsdp_full"], dtype=torch.float32).eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- checkpoints and resume


def test_checkpoints_are_sharded_and_complete(runs):
    for name in ("fsdp_full", "fsdp_lora"):
        folder = runs[name] / f"checkpoint-{SAVE_STEPS}"
        assert checkpoint_problems(folder) == []
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert len(list((folder / part).glob("*.distcp"))) == RANKS, (name, part)  # one file per rank
        assert not list(folder.glob("*.safetensors")) and not (folder / "optimizer.pt").exists()


def killed_config(work: Path, models: dict[str, Path], mode: str, **extra) -> Path:
    return run_config(
        work, models, f"killed_{mode}", "llama", mode, PER_RANK_BATCH, fsdp="full_shard", fsdp_config=SHARDED, **extra
    )


def kill_and_resume(work: Path, models: dict[str, Path], mode: str) -> Path:
    """kill -9 of rank 1 after sharded checkpoint-2, then a launch that resumes from it."""
    proc = launch([killed_config(work, models, mode)], DIST_WORKER_KILL=f"1:{KILL_AT}")
    with pytest.raises(AssertionError, match="exited"):
        check_launch([proc])
    out = work / f"killed_{mode}"
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{SAVE_STEPS}"]
    check_launch([launch([killed_config(work, models, mode, resume_from_checkpoint=True)])])
    return out


@pytest.mark.parametrize("mode", ["full", pytest.param("lora", marks=pytest.mark.slow)])
def test_kill_one_rank_after_a_sharded_checkpoint_and_resume(work, models, runs, mode):
    """The resumed run reads the sharded weights and optimizer state and ends where the uninterrupted one does."""
    assert_same_training(kill_and_resume(work, models, mode), runs[f"fsdp_{mode}"], first_step=SAVE_STEPS + 1)


# ---------------------------------------------------------------- one process


def test_plain_python_runs_fsdp_as_one_rank(work, models, single):
    """`python train.py` with fsdp set: a one-rank launch (transformers refuses FSDP without a process group)."""
    cfg = run_config(
        work, models, "plain_fsdp", "llama", "full", RANKS * PER_RANK_BATCH, fsdp="full_shard", fsdp_config=SHARDED
    )
    check_launch([start([sys.executable, str(WORKER), str(cfg)], DIST_WORKER_SHARDING="1")])
    report = json.loads((work / "plain_fsdp" / "sharding.json").read_text())
    assert report["world_size"] == 1 and not report["ddp"]
    assert {info["type"] for info in report["params"].values()} == {"DTensor"}
    assert_same_training(work / "plain_fsdp", single["single_full"])


# ---------------------------------------------------------------- config checks (no launch)


def problems(**values) -> list[str]:
    return fsdp.fsdp_problems({"train_mode": "full", "fsdp": "full_shard", **values})


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"deepspeed": "train_args/ds_z2_config.json"}, "keys 'fsdp' and 'deepspeed'"),
        ({"fsdp_config": {"fsdp_version": 1}}, "fsdp_version': 1 (FSDP1"),
        ({"fsdp_config": {"version": 3}}, "expected 2, got 3"),
        ({"fsdp": "hybrid_shard"}, "'hybrid_shard' is FSDP1 only"),
        ({"fsdp": "full_shard shard_grad_op"}, "one of full_shard, shard_grad_op"),
        ({"fsdp": "ful_shard"}, "did you mean 'full_shard'"),
        ({"fsdp_config": {"fsdp_versoin": 2}}, "did you mean 'fsdp_version'"),
        ({"fsdp_config": {"fsdp_use_orig_params": True}}, "fsdp_config.use_orig_params': FSDP1 only"),
        ({"fsdp_config": {"xla": True}}, "PyTorch/XLA"),
        ({"fsdp_config": {"fsdp_state_dict_type": "LOCAL_STATE_DICT"}}, "fsdp_state_dict_type'"),
        (
            {"fsdp_config": {"fsdp_cpu_ram_efficient_loading": "yes"}},
            "expected true or false (a JSON boolean, not text), got 'yes'",
        ),
        ({"train_mode": "qlora"}, "bnb_4bit_quant_storage"),
        ({"train_mode": "freeze"}, "train_mode 'freeze'"),
        ({"task_type": "dpo"}, "task_type 'dpo'"),
        ({"train_mode": "lora", "lora_init": "pissa"}, "key 'lora_init'"),
        (
            {"activation_checkpointing": True, "fsdp_config": {"fsdp_activation_checkpointing": True}},
            "choose one",
        ),
        ({"save_only_model": True, "fsdp_config": SHARDED}, "save_only_model"),
        ({"fsdp": False, "fsdp_config": {"fsdp_version": 2}}, "'fsdp' is not, so FSDP would stay off"),
        ({"fsdp_config": "no/such/fsdp.json"}, "not found"),
    ],
)
def test_refused_fsdp_settings_name_their_key(values, expected):
    found = problems(**values)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU offload is refused on a machine without a GPU only")
@pytest.mark.parametrize("values", [{"fsdp": "full_shard offload"}, {"fsdp_config": {"fsdp_cpu_offload": True}}])
def test_cpu_offload_without_a_gpu_is_refused(values):
    found = problems(**values)
    assert len(found) == 1 and "fsdp_cpu_offload" in found[0] and "no CUDA GPU" in found[0]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"fsdp": True},
        {"fsdp": "shard_grad_op auto_wrap"},
        {"train_mode": "lora", "fsdp_config": {"version": 2, "activation_checkpointing": True}},
        {"fsdp_config": {**SHARDED, "fsdp_cpu_ram_efficient_loading": True, "fsdp_reshard_after_forward": False}},
        {"fsdp": None, "fsdp_config": None},  # no FSDP at all
    ],
)
def test_accepted_fsdp_settings(values):
    assert problems(**values) == []


@pytest.mark.parametrize("text", ["false", "true"])
def test_boolean_settings_as_text_are_refused(text):
    """transformers reads cpu_offload by truthiness: the text "false" would switch offloading on."""
    found = problems(fsdp_config={"fsdp_cpu_offload": text})
    assert any("fsdp_cpu_offload': expected true or false (a JSON boolean, not text)" in p for p in found), found


def test_fsdp_config_file_is_read(tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"fsdp_version": 1}))
    assert "FSDP1" in problems(fsdp_config=str(path))[0]
    path.write_text("[1]")
    assert "expected an object" in problems(fsdp_config=str(path))[0]


def test_refused_before_output_dir_with_every_problem(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    values = base_config(
        tiny_llama_dir,
        out,
        max_prompt_length=64,
        train_mode="qlora",
        fsdp="full_shard",
        fsdp_config={"fsdp_version": 1},
        deepspeed="train_args/ds_z2_config.json",
    )
    cfg = write_config(tmp_path / "c.json", **values)
    assert train.main([CONFIG_FILE_FLAG, str(cfg)]) == USER_ERROR_EXIT_CODE
    assert not out.exists()
    with pytest.raises(Exception) as err:
        load_config([CONFIG_FILE_FLAG, str(cfg)])
    text = str(err.value)
    assert "fsdp_version" in text and "'deepspeed'" in text and "qlora" in text


def test_a_runs_saved_config_loads_again(runs, monkeypatch):
    """train_args.json holds TrainingArguments' resolved fsdp_config (xla keys false and all): a config too."""
    monkeypatch.chdir(ROOT)
    values, _ = load_values([CONFIG_FILE_FLAG, str(runs["fsdp_full"] / "train_args.json")])
    assert values["fsdp"] and values["fsdp_config"]["state_dict_type"] == fsdp.SHARDED_STATE_DICT


def test_accelerate_fsdp_switch_follows_the_config(monkeypatch):
    monkeypatch.delenv(distributed.ACCELERATE_FSDP_ENV, raising=False)
    distributed.set_fsdp_environment(True)
    assert os.environ[distributed.ACCELERATE_FSDP_ENV] == "true"  # before the model loads (ram-efficient loading)
    distributed.set_fsdp_environment(False)  # a later run without fsdp, or a launcher's --use_fsdp
    assert distributed.ACCELERATE_FSDP_ENV not in os.environ


def test_plain_python_with_fsdp_gets_a_one_rank_environment(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    assert not distributed.emulate_one_rank_launch({"fsdp": None})
    assert distributed.emulate_one_rank_launch({"fsdp": "full_shard"})
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1")


def test_shipped_fsdp2_config():
    """The 8-GPU full fine-tune: FSDP2, sharded checkpoints, FSDP's activation checkpointing, bf16, one copy
    of the weights in CPU memory while loading (validated with every shipped config in tests/test_shipped.py)."""
    raw = json.loads(SHIPPED.read_text())
    assert raw["train_mode"] == "full" and raw["fsdp"] is True and raw["bf16"] is True
    settings, problem = fsdp.read_fsdp_config(raw["fsdp_config"])
    assert problem is None and settings["version"] == 2
    assert settings["state_dict_type"] == fsdp.SHARDED_STATE_DICT
    assert settings["activation_checkpointing"] is True and settings["cpu_ram_efficient_loading"] is True
    assert settings["reshard_after_forward"] is True  # full_shard, said the way transformers 5 prefers
    assert "activation_checkpointing" not in raw  # FSDP's own, not both


# ---------------------------------------------------------------- GPU


LLAMA_1B = dict(  # TinyLlama-1.1B's shape (bench/sft_throughput.py's llama1b_gpu), random weights
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=2048,
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: FSDP2 with NCCL on one GPU")
def test_fsdp2_one_gpu_llama_1b_bf16_against_ddp(tmp_path):
    """One process on CUDA, bf16, full fine-tuning of a 1.1B Llama: FSDP2 and DDP (torchrun, 1 rank) train
    alike; prints tokens/s and peak GPU memory of both (report.json)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny import tiny_tokenizer

    model_dir = tmp_path / "llama-1b"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32000, **LLAMA_1B, **ids)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    results = {}
    for name, extra in (("ddp", {}), ("fsdp", {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}})):
        values = base_config(
            model_dir,
            tmp_path / name,
            train_file=str(ROOT / "data" / "sft_sample.jsonl"),
            train_mode="full",
            bf16=True,
            learning_rate=1e-5,
            per_device_train_batch_size=4,
            max_seq_length=1024,
            max_steps=10,
            save_steps=1000,
            **extra,
        )
        cfg = write_config(tmp_path / f"{name}.json", **values)
        proc = subprocess.run(
            torchrun("--nproc_per_node=1", f"--master_port={distributed.free_port()}", str(WORKER), str(cfg)),
            cwd=ROOT,
            env={**launch_env(), "DIST_WORKER_SHARDING": "1"},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        results[name] = json.loads((tmp_path / name / "report.json").read_text())
        shutil.rmtree(tmp_path / name / f"checkpoint-{values['max_steps']}", ignore_errors=True)
    sharding = json.loads((tmp_path / "fsdp" / "sharding.json").read_text())
    assert {info["type"] for info in sharding["params"].values()} == {"DTensor"} and not sharding["ddp"]
    for name, report in results.items():
        print(
            f"{name}: {report.get('real_tokens_per_second')} tokens/s, "
            f"peak GPU {report.get('peak_gpu_allocated_mib')} MiB allocated"
        )
    assert results["fsdp"]["real_tokens_per_second"] and results["ddp"]["real_tokens_per_second"]
