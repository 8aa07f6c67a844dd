"""Streaming pretraining data: JSONL text read while the model trains, packed into blocks on the fly.

For corpora larger than memory (`streaming: true`, task_type pretrain). Nothing is tokenized or
cached up front: memory holds one read chunk of a file and a few batches of blocks, whatever the
size of the corpus.

Reading: datasets' streaming `text` builder over the JSONL files (`jsonl_files` order, each file one
shard, read 10 MB at a time). Each line is parsed and checked here with packing.check_document, so a
bad line is reported as `file:line` when the stream reaches it (or skipped and logged, with
skip_invalid_examples).

Packing: block for block what packing.pack makes of the same files: each document + EOS,
concatenated, cut into blocks of max_seq_length; position_ids restart at every document and every
block; the last block of a pass keeps its remainder. Passes over the files follow one another until
max_steps. Blocks come in file order: a shuffle buffer's contents would be lost on resume.

Resuming: a `StreamPosition` names where a block starts: the pass, datasets' own iterable state
(`IterableDataset.state_dict()`) after the line before the block's first document, and how many of
that document's tokens earlier blocks took. `PackedStream.position(n)` gives it for block n once
block n-1 has been produced; `start_at(position)` continues with exactly block n.
`StreamPositionCallback` saves it in each checkpoint (trainer_state.json, as transformers'
ExportableState) and hands it back to the stream when a run resumes.

Under torchrun every rank reads the same stream and accelerate hands each rank its own slice of
every global batch (IterableDatasetShard): the ranks train on different blocks, and 2 ranks at
batch 2 see exactly the blocks 1 process at batch 4 sees. `configure_trainer_arguments` sets the
Trainer settings all this relies on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from datasets import load_dataset
from loguru import logger
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from component.data.jsonl import Problem, jsonl_files, raise_problems
from component.data.packing import check_document
from component.data.sft import SKIP_HINT
from component.errors import ConfigError, DataError

# Documents tokenized per call: the fast tokenizer's batch call costs far less per document.
READ_BATCH = 256
# datasets' text builder reads this many bytes of a file at a time (its own default).
CHUNK_BYTES = 10 << 20
# Positions held for blocks already produced, beyond the batches the data loader reads ahead.
MIN_HISTORY = 1024
INVALID_LINES_LOGGED = 20


@dataclass(frozen=True)
class StreamPosition:
    """Where block `block` starts: in pass `epoch` (from 0), the first document after the line
    datasets' iterable state `source` stopped at (None: the pass's first document), `skip` tokens in."""

    block: int
    epoch: int = 0
    source: Optional[dict] = None
    skip: int = 0


@dataclass
class StreamSummary:
    """What is known of streamed data before training: its files, not its documents."""

    files: int
    size_bytes: int
    max_seq_length: int
    streaming: bool = True

    def describe(self) -> str:
        return (
            f"{self.files} file(s), {self.size_bytes / 1e6:.1f} MB, streamed: read, tokenized and packed into blocks of "
            f"{self.max_seq_length} while training (documents and tokens are not counted up front)"
        )


# ---------------------------------------------------------------- packing


class BlockPacker:
    """Fills one block at a time from documents' tokens, with position_ids as packing.pack sets them."""

    def __init__(self, max_len: int):
        self.ids = np.empty(max_len, np.int32)
        self.positions = np.empty(max_len, np.int32)
        self.fill = 0

    def add(self, tokens: np.ndarray, start: int = 0) -> Iterator[tuple[dict, int]]:
        """Append tokens[start:]; yield each block this completes, with how many of `tokens` it took so far."""
        k, size = start, len(self.ids)
        while k < len(tokens):
            take = min(size - self.fill, len(tokens) - k)
            end = self.fill + take
            self.ids[self.fill : end] = tokens[k : k + take]
            # A token's position counts from its document's start or its block's, whichever is later.
            self.positions[self.fill : end] = np.minimum(np.arange(k, k + take), np.arange(self.fill, end))
            self.fill, k = end, k + take
            if self.fill == size:
                yield self.take(), k

    def take(self) -> dict:
        block = {"input_ids": self.ids[: self.fill].copy(), "position_ids": self.positions[: self.fill].copy()}
        self.fill = 0
        return block


# ---------------------------------------------------------------- reading


def _shard_and_line(state: Any) -> Optional[tuple[int, int]]:
    """(file index, line number) of the line last read, from datasets' iterable state; None if not found."""
    while isinstance(state, dict):
        if "shard_idx" in state and "shard_example_idx" in state:
            return state["shard_idx"], state["shard_example_idx"]  # counted before the line is handed out
        state = state.get("examples_iterable")
    return None


def _parse_line(line: str) -> Union[dict, str]:
    """The document (`{"text": ...}`), or a string naming what is wrong with the line."""
    try:
        return check_document(json.loads(line))
    except json.JSONDecodeError as exc:
        # Bytes that are not UTF-8 arrive as `\xNN` (backslashreplace), which no JSON text holds.
        hint = " or bytes that are not UTF-8" if exc.msg.startswith("Invalid \\escape") else ""
        return f"invalid JSON{hint}: {exc.msg} (column {exc.colno})"
    except (ValueError, RecursionError) as exc:  # nested too deep, or an integer too long
        return f"invalid JSON: {str(exc).split(';')[0]}"


class PackedStream(torch.utils.data.IterableDataset):
    """Packed blocks of a JSONL corpus, read as they are trained on, pass after pass; see the module docstring."""

    def __init__(
        self,
        path: str,
        tokenizer,
        max_len: int,
        skip_invalid: bool = False,
        history: int = MIN_HISTORY,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.path = path
        self.files = jsonl_files(path)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.skip_invalid = skip_invalid
        self.history = history
        self.chunk_bytes = chunk_bytes
        self.invalid_lines = 0
        self._rng_state: Optional[torch.Tensor] = None
        self.start_at(StreamPosition(0))

    @property
    def summary(self) -> StreamSummary:
        return StreamSummary(len(self.files), sum(f.stat().st_size for f in self.files), self.max_len)

    def start_at(self, position: StreamPosition) -> None:
        """The next iteration yields block `position.block` first."""
        self.start = position
        self._positions: dict[int, StreamPosition] = {position.block: position}

    def position(self, block: int) -> StreamPosition:
        """Where block `block` starts; held for the blocks produced lately (`history` of them)."""
        if block not in self._positions:
            held = f"{min(self._positions)}..{max(self._positions)}"
            raise RuntimeError(f"the stream holds no position for block {block} (it holds blocks {held})")
        return self._positions[block]

    def check_start(self) -> None:
        """Read up to the first document now, so that unreadable data stops the run before it starts."""
        if next(self._documents(self.start.source, self.start.epoch), None) is None and self.start.source is None:
            raise DataError(f"{self.path}: no valid documents (every line is empty or was skipped)")

    def set_epoch(self, epoch: int) -> None:
        """Called (through accelerate) just before the data loader creates its iterator: see __iter__."""
        self._rng_state = torch.random.get_rng_state()

    def __iter__(self) -> Iterator[dict]:
        if self._rng_state is not None:
            # Creating the data loader's iterator draws a seed from torch's generator (unused without
            # workers). A resumed run creates it after the Trainer restored the checkpoint's random
            # state, the uninterrupted run before step 1: undone here, dropout stays the same in both.
            torch.random.set_rng_state(self._rng_state)
            self._rng_state = None
        position = self.start
        while True:
            last = position
            for block, last in self._pass(position):
                self._remember(last)
                yield block
            if last is position and position.source is None and position.skip == 0:
                raise DataError(f"{self.path}: no valid documents (every line is empty or was skipped)")
            # The pass's last block was full: the next pass starts at the same block number.
            position = last if last.epoch > position.epoch else StreamPosition(last.block, position.epoch + 1)

    def _remember(self, position: StreamPosition) -> None:
        self._positions[position.block] = position
        if len(self._positions) > self.history:
            del self._positions[next(iter(self._positions))]  # the oldest

    def _pass(self, start: StreamPosition) -> Iterator[tuple[dict, StreamPosition]]:
        """The blocks of one pass from `start`, each with the position of the block after it."""
        packer = BlockPacker(self.max_len)
        block, skip = start.block, start.skip
        for before, after, tokens in self._documents(start.source, start.epoch):
            for out, used in packer.add(tokens, skip):
                block += 1
                if used < len(tokens):
                    yield out, StreamPosition(block, start.epoch, before, used)
                else:
                    yield out, StreamPosition(block, start.epoch, after, 0)
            skip = 0
        if packer.fill:  # the remainder, kept as its own short block
            yield packer.take(), StreamPosition(block + 1, start.epoch + 1)

    def _open(self, source: Optional[dict]):
        # backslashreplace: a byte that is not UTF-8 becomes `\xNN` and its line fails to parse as
        # JSON, so it is reported with its file and line instead of stopping the read.
        dataset = load_dataset(
            "text",
            data_files=[str(f) for f in self.files],
            split="train",
            streaming=True,
            encoding_errors="backslashreplace",
            chunksize=self.chunk_bytes,
        )
        if source is not None:
            dataset.load_state_dict(source)
        return dataset

    def _documents(self, source: Optional[dict], epoch: int) -> Iterator[tuple[Optional[dict], dict, np.ndarray]]:
        """Each valid document's tokens + EOS, with datasets' state before and after its line."""
        dataset = self._open(source)
        pending: list[tuple[Optional[dict], dict, str]] = []
        before = source
        for row in dataset:
            after = dataset.state_dict()
            text = self._text(row["text"], after, epoch)
            if text is not None:
                pending.append((before, after, text))
            before = after
            if len(pending) == READ_BATCH:
                yield from self._tokenized(pending)
                pending = []
        yield from self._tokenized(pending)

    def _text(self, line: str, state: dict, epoch: int) -> Optional[str]:
        if not line.strip():
            return None
        result = _parse_line(line)
        if isinstance(result, dict):
            return result["text"]
        where = _shard_and_line(state)
        name, number = (str(self.files[where[0]]), where[1]) if where else (self.path, 0)
        problem = Problem(name, number, result)
        if not self.skip_invalid:
            raise_problems(self.path, [problem], SKIP_HINT)
        if epoch > 0:  # counted and logged in the first pass
            return None
        self.invalid_lines += 1
        if self.invalid_lines <= INVALID_LINES_LOGGED:
            logger.warning(f"skipped invalid line {problem}")
        if self.invalid_lines == INVALID_LINES_LOGGED:
            logger.warning("further invalid lines are skipped without being listed")
        return None

    def _tokenized(self, pending: list) -> Iterator[tuple[Optional[dict], dict, np.ndarray]]:
        if not pending:
            return
        ids = self.tokenizer([text for _, _, text in pending], add_special_tokens=False)["input_ids"]
        for (before, after, _), doc in zip(pending, ids, strict=True):
            tokens = np.empty(len(doc) + 1, np.int32)
            tokens[:-1] = doc
            tokens[-1] = self.tokenizer.eos_token_id
            yield before, after, tokens


# ---------------------------------------------------------------- checkpoints


class StreamPositionCallback(TrainerCallback, ExportableState):
    """Saves the stream's position in each checkpoint and gives it back to the stream on resume.

    The position travels in the checkpoint's trainer_state.json (`stateful_callbacks`, written by the
    Trainer at every save). After step s the Trainer has taken `blocks_per_step` blocks per step since
    the position it started from, so block `origin + (s - origin_step) * blocks_per_step` is next.
    """

    def __init__(self, stream: PackedStream):
        self.stream = stream
        self.blocks_per_step = 0
        self.origin_step, self.origin_block = 0, stream.start.block
        self.trainer_state = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer_state = state
        self.blocks_per_step = blocks_per_step(args)  # here: auto_find_batch_size may have changed the batch
        if state.global_step == 0:
            return
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        if "position" not in attributes:
            raise ConfigError(
                f"key 'resume_from_checkpoint': the checkpoint of step {state.global_step} holds no stream "
                "position (it was saved by a run without streaming): resume it with streaming: false, or start "
                "a new run"
            )
        position = StreamPosition(**attributes["position"])
        self.stream.start_at(position)
        self.origin_step, self.origin_block = attributes["step"], position.block
        logger.info(
            f"streaming: resuming at block {position.block} (pass {position.epoch + 1}, {position.skip} tokens "
            "into a document); the Trainer skips no batches"
        )

    def state(self) -> dict:
        step = self.trainer_state.global_step if self.trainer_state is not None else self.origin_step
        block = self.origin_block + (step - self.origin_step) * self.blocks_per_step
        position = asdict(self.stream.position(block))
        return {"args": {}, "attributes": {"step": step, "blocks_per_step": self.blocks_per_step, "position": position}}


def configure_trainer_arguments(args) -> None:
    """The Trainer settings a streaming run relies on, set on its TrainingArguments (by the pretrain task)."""
    # The stream resumes at its saved position: the Trainer must not also skip batches by reading them.
    args.ignore_data_skip = True
    # StreamPositionCallback restores itself (it holds the stream); the Trainer's restore would replace it.
    args.restore_callback_states_from_checkpoint = False
    # Every rank reads the stream and IterableDatasetShard gives each its slice of a global batch.
    # Dispatching (rank 0 reads, then cuts collated batches) would cut unpacked batches, whose rows
    # are documents, not blocks, in the wrong places.
    args.accelerator_config.dispatch_batches = False


def blocks_per_step(args) -> int:
    """Blocks the run takes from the stream per optimizer step, over all ranks."""
    return args.train_batch_size * args.gradient_accumulation_steps * args.world_size


def open_stream(path: str, tokenizer, max_len: int, args, skip_invalid: bool = False) -> PackedStream:
    """The stream for a run: positions held for well beyond the batches the data loader reads ahead."""
    history = MIN_HISTORY + 4 * args.train_batch_size * args.world_size
    stream = PackedStream(path, tokenizer, max_len, skip_invalid=skip_invalid, history=history)
    stream.check_start()
    return stream
