"""Streaming pretraining (`streaming: true`): the same blocks as packing, resumed at the exact block.

The stream is checked against the non-streaming packing block for block, and a stream restarted
at any block's saved position against the uninterrupted stream. The training test stops a run
after its checkpoint, resumes it, and compares the resumed run's batches (the input_ids the model
was called with) and losses with the uninterrupted run's, step by step.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from component.data.packing import load_packed
from component.data.streaming import PackedStream, StreamPosition
from component.errors import ConfigError, DataError
from component.training.checkpoints import mark_complete
from component.training.distributed import free_port
from tests.conftest import ROOT, base_config, write_config
from tests.runs import config_of, final_weights, subprocess_env, train, trainer_losses
from tests.tiny import tiny_tokenizer

WORDS = "The quick brown fox jumps over the lazy dog . What is two plus two ? Two plus two is four .".split()
BLOCK = 16
SMALL_CHUNK = 100  # bytes per read: the tests cross many of datasets' read chunks


def write_corpus(path: Path, documents: int, seed: int = 0, max_words: int = 40) -> Path:
    """`documents` lines of {"text": ...}, from 1 word (shorter than a block) to several blocks long."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(1, max_words)))}) for _ in range(documents))
    path.write_text("".join(line + "\n" for line in lines))
    return path


def blocks(stream: PackedStream, n: int) -> list[tuple[list[int], list[int]]]:
    return [(b["input_ids"].tolist(), b["position_ids"].tolist()) for b in itertools.islice(iter(stream), n)]


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    write_corpus(folder / "a.jsonl", 30, seed=1)
    write_corpus(folder / "sub" / "b.jsonl", 30, seed=2)
    return folder


# ---------------------------------------------------------------- the stream


def test_stream_gives_the_packed_blocks_pass_after_pass(corpus, tmp_path):
    tok = tiny_tokenizer()
    packed = load_packed(str(corpus), tok, BLOCK, tmp_path / "cache").dataset
    n = len(packed)
    assert len(packed["input_ids"][-1]) < BLOCK  # a short last block: the pass boundary is visible
    got = blocks(PackedStream(str(corpus), tok, BLOCK, chunk_bytes=SMALL_CHUNK), 2 * n + 2)
    one_pass = list(zip(packed["input_ids"], packed["position_ids"], strict=True))
    assert got[:n] == one_pass
    assert got[n : 2 * n] == one_pass  # the second pass starts afresh, the remainder kept again
    assert got[2 * n :] == one_pass[:2]


def test_a_stream_started_at_any_blocks_position_continues_with_that_block(corpus):
    tok = tiny_tokenizer()
    stream = PackedStream(str(corpus), tok, BLOCK, chunk_bytes=SMALL_CHUNK)
    total = 110  # past the end of the first pass (about 90 blocks)
    reference = blocks(stream, total)
    skips = 0
    for i in range(total):
        position = stream.position(i)
        assert position.block == i
        skips += position.skip > 0
        resumed = PackedStream(str(corpus), tok, BLOCK, chunk_bytes=SMALL_CHUNK)
        resumed.start_at(StreamPosition(**json.loads(json.dumps(asdict(position)))))  # as a checkpoint holds it
        assert blocks(resumed, total - i) == reference[i:], i
    assert skips > 10  # most blocks start inside a document
    assert stream.position(total - 1).epoch == 1


def test_bad_lines_name_file_and_line_when_the_stream_reaches_them(tmp_path):
    folder = tmp_path / "corpus"
    write_corpus(folder / "a.jsonl", 2, max_words=3)
    bad = folder / "b.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n\n{"txt": "typo"}\nnot json\n{"text": "caf\xff"}\n{"text": "also fine"}\n')
    tok = tiny_tokenizer()
    with pytest.raises(DataError) as err:
        blocks(PackedStream(str(folder), tok, BLOCK), 50)
    assert f"{bad}:3: missing key 'text'" in str(err.value) and "skip_invalid_examples" in str(err.value)

    skipping = PackedStream(str(folder), tok, BLOCK, skip_invalid=True)
    got = [t for ids, _ in blocks(skipping, 12) for t in ids]  # several passes
    # The typo, the non-JSON line and the non-UTF-8 line, once (not once per pass); a blank line is no line.
    assert skipping.invalid_lines == 3
    fine = tok("also fine", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert any(got[i : i + len(fine)] == fine for i in range(len(got)))


def test_a_corpus_without_a_valid_document_stops_before_training(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"txt": 1}\n\n')
    with pytest.raises(DataError, match="no valid documents"):
        PackedStream(str(empty), tiny_tokenizer(), BLOCK, skip_invalid=True).check_start()


def test_streaming_config_needs_max_steps_pretrain_and_no_workers(tiny_llama_dir, tmp_path):
    values = base_config(tiny_llama_dir, tmp_path / "out", streaming=True, max_steps=-1, dataloader_num_workers=2)
    with pytest.raises(ConfigError) as err:
        config_of(values)
    message = str(err.value)
    assert "key 'streaming': only task_type 'pretrain'" in message
    assert "key 'max_steps': streaming: true needs max_steps > 0" in message
    assert "key 'dataloader_num_workers': must be 0 with streaming" in message


# ---------------------------------------------------------------- training and resuming

STEPS = 8
SAVE_STEPS = 2
STOP_AFTER = 5  # trained, but after checkpoint-4: the resumed run must go back to checkpoint-4's block


class BatchRecorder(TrainerCallback):
    """The input_ids of every training forward call, by optimizer step (a forward pre-hook on the model)."""

    def __init__(self):
        self.batches: dict[int, list[torch.Tensor]] = {}
        self.step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def _record(self, module, args, kwargs):
        if module.training and "input_ids" in kwargs:
            self.batches.setdefault(self.step, []).append(kwargs["input_ids"].detach().clone())


class Stopped(Exception):
    pass


class StopAfter(TrainerCallback):
    """Fails as step `step + 1` begins, as a killed run would stop: nothing saved after checkpoint-`step`'s save."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Stopped(f"stopped by the test before step {self.step + 1}")


def streaming_config(model_dir: Path, out: Path, corpus: Path, **overrides) -> dict:
    values = base_config(
        model_dir,
        out,
        task_type="pretrain",
        train_file=str(corpus),
        streaming=True,
        max_seq_length=32,
        max_steps=STEPS,
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        lora_dropout=0.1,  # resuming must restore the random state too
    )
    values.pop("template_name")
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def streamed_reference(tiny_llama_dir, tmp_path_factory):
    """The uninterrupted streaming run: 8 steps of 4 blocks, over a corpus of 13 blocks (the last short)."""
    tmp = tmp_path_factory.mktemp("streaming-reference")
    corpus = write_corpus(tmp / "corpus.jsonl", 22, seed=3, max_words=30)
    recorder = BatchRecorder()
    trainer = train(streaming_config(tiny_llama_dir, tmp / "out", corpus), callbacks=[recorder])
    return corpus, tmp / "out", recorder.batches, trainer_losses(trainer)


def test_stopped_and_resumed_streaming_run_trains_the_same_batches(tiny_llama_dir, tmp_path, streamed_reference):
    corpus, reference_out, reference_batches, reference_losses = streamed_reference
    assert sorted(reference_batches) == list(range(1, STEPS + 1)) and len(reference_losses) == STEPS
    out = tmp_path / "out"
    values = streaming_config(tiny_llama_dir, out, corpus)
    first = BatchRecorder()
    with pytest.raises(Stopped):
        train(values, callbacks=[first, StopAfter(STOP_AFTER)])
    for step in range(1, STOP_AFTER + 1):
        assert [b.tolist() for b in first.batches[step]] == [b.tolist() for b in reference_batches[step]], step

    saved = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    position = saved["StreamPositionCallback"]["attributes"]
    assert position["step"] == 4 and position["blocks_per_step"] == 4 and position["position"]["block"] == 16
    # Checkpoint-4 resumes in the second pass over the corpus, inside a document.
    assert position["position"]["epoch"] == 1 and position["position"]["skip"] > 0

    resumed = BatchRecorder()
    trainer = train({**values, "resume_from_checkpoint": True}, callbacks=[resumed])
    assert sorted(resumed.batches) == list(range(5, STEPS + 1))  # from checkpoint-4: step 5 is trained again
    for step in range(5, STEPS + 1):
        got = [b.tolist() for b in resumed.batches[step]]
        assert got == [b.tolist() for b in reference_batches[step]], f"step {step}: other blocks than the reference"
    losses = trainer_losses(trainer)[-(STEPS - 4) :]
    assert losses == pytest.approx(reference_losses[4:], rel=1e-5)
    want, got_weights = final_weights(reference_out), final_weights(out)
    for key in want:
        torch.testing.assert_close(got_weights[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resuming_from_a_checkpoint_without_a_stream_position_is_refused(tiny_llama_dir, tmp_path, streamed_reference):
    corpus, reference_out, _, _ = streamed_reference
    out = tmp_path / "out"
    values = streaming_config(tiny_llama_dir, out, corpus, max_steps=2)
    train(values)
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["StreamPositionCallback"]  # as a run without streaming saves it
    state_file.write_text(json.dumps(state))
    mark_complete(out / "checkpoint-2", 2)
    (out / "training_meta.json").unlink()  # not finished: resumable
    with pytest.raises(ConfigError, match="holds no stream position"):
        train({**values, "max_steps": 4, "resume_from_checkpoint": str(out / "checkpoint-2")})


def test_streaming_run_evaluates_on_a_packed_eval_file(tiny_llama_dir, tmp_path, streamed_reference):
    corpus = streamed_reference[0]
    out = tmp_path / "out"
    values = streaming_config(
        tiny_llama_dir, out, corpus, max_steps=2, eval_file=str(corpus), eval_strategy="steps", eval_steps=2
    )
    trainer = train(values)
    assert any("eval_loss" in h for h in trainer.state.log_history)
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["streaming"] is True and summary["files"] == 1 and summary["size_bytes"] == corpus.stat().st_size


# ---------------------------------------------------------------- scale


def _launch(cmd: list[str], timeout: int = 900) -> None:
    env = subprocess_env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.mark.slow
def test_two_ranks_stream_different_blocks_like_one_process(tiny_llama_dir, tmp_path, streamed_reference):
    """torchrun, 2 CPU ranks at batch 2 (x2 accumulation) train exactly like 1 process at batch 4.

    A rank that read the whole stream instead of its slice shows up as another loss at step 1."""
    corpus = streamed_reference[0]
    common = dict(lora_dropout=0.0)  # each rank draws its own dropout masks
    reference = train(
        streaming_config(tiny_llama_dir, tmp_path / "single", corpus, per_device_train_batch_size=4, **common)
    )
    ranks = write_config(
        tmp_path / "ranks.json", **streaming_config(tiny_llama_dir, tmp_path / "ranks", corpus, **common)
    )
    port = free_port()
    worker = ROOT / "tests" / "dist_worker.py"
    _launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(worker),
            str(ranks),
        ]
    )
    states = [
        json.loads((tmp_path / run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
        for run in ("ranks", "single")
    ]
    losses = [h["loss"] for h in states[0]["log_history"] if "loss" in h]
    assert losses == pytest.approx(trainer_losses(reference), abs=2e-5)
    # Rank 0 saved the position of both ranks' blocks: the one the single process saved.
    ranks_position, single_position = (s["stateful_callbacks"]["StreamPositionCallback"] for s in states)
    assert ranks_position == single_position and single_position["attributes"]["position"]["block"] == 8 * STEPS


@pytest.mark.slow
def test_streaming_rss_benchmark_runs_small(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("streaming_rss", ROOT / "bench" / "streaming_rss.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--size_gb", "0.05", "--work_dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["corpus_bytes"] >= 0.05e9 and result["passes_completed"] == 1
    assert result["peak_rss_gb"] < 3.0
    assert not any(tmp_path.iterdir())  # the corpus is deleted afterwards
