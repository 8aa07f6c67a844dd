"""Pretraining data: raw text, packed into blocks, cached; batches that keep documents apart.

Data: a JSONL file, or every *.jsonl below a folder, one `{"text": ...}` per
line (other keys are ignored); bad lines are reported as `file:line`.

Packing: each document is tokenized without special tokens and followed by
EOS; the documents are concatenated and cut into blocks of `max_seq_length`.
The last block keeps its remainder (padded in the batch, never dropped).
`position_ids` restart at 0 at every document start and every block start,
and the label of every position-0 token is IGNORE_INDEX, so no token learns
to predict across a boundary. How attention is kept inside a document is
a `PackingMode` of the collator, chosen per model by the pretrain task
(component/tasks/pretrain.py) after a check on the loaded model.

Cache: the packed blocks are saved under `data_cache_dir` (default:
`data_cache/` next to `output_dir`), keyed by the files' contents, the
tokenizer and `max_seq_length`; any change builds a new entry. The main
process builds first; the other ranks then read what it wrote.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from datasets import Dataset, load_from_disk

from component.data.cache import META_FILE, code_digest, save_atomically, tokenizer_digest
from component.data.jsonl import Problem, jsonl_files, raise_problems, read_jsonl
from component.data.sft import SKIP_HINT
from component.data.template import IGNORE_INDEX


class PackingMode(str, enum.Enum):
    """How a batch of packed blocks keeps its documents apart."""

    POSITION_IDS = "position_ids"
    """attention_mask None + restarting position_ids: the attention builds the per-document mask."""
    BLOCK_MASK = "block_mask"
    """An explicit 4D block-diagonal causal mask."""
    UNPACKED = "unpacked"
    """Each document of a block becomes its own, right-padded row (any model, incl. recurrent)."""


# ---------------------------------------------------------------- reading


def check_document(obj: Any) -> Union[str, dict]:
    """The document's text, or a string naming what is wrong."""
    if not isinstance(obj, dict):
        return f"expected a JSON object with a 'text' key, got {type(obj).__name__}"
    if "text" not in obj:
        return f"missing key 'text' (keys present: {', '.join(sorted(obj)) or 'none'})"
    if not isinstance(obj["text"], str):
        return f"'text' must be a string, got {type(obj['text']).__name__}"
    if not obj["text"].strip():
        return "empty text"
    return {"text": obj["text"]}


# ---------------------------------------------------------------- cache key


def files_digest(path: str) -> str:
    """Hash of the data: every file's name (relative to `path`) and contents."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in jsonl_files(path):
        name = file.relative_to(root).as_posix() if root.is_dir() else file.name
        digest.update(name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def cache_key(path: str, tokenizer, max_len: int) -> str:
    parts = [code_digest(), files_digest(path), tokenizer_digest(tokenizer), str(max_len)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


# ---------------------------------------------------------------- packing


def _tokenize_batch(batch: dict, tokenizer) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [x + [tokenizer.eos_token_id] for x in ids]}


def tokenize_documents(texts: list[str], tokenizer, num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """All documents' tokens (each + EOS) as one flat array, and the document start offsets."""
    raw = Dataset.from_dict({"text": texts})
    workers = num_workers if num_workers > 1 and len(raw) >= num_workers else None
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer},
        remove_columns=["text"],
        num_proc=workers,
        desc="Tokenizing",
    )
    column = tokenized.data.column("input_ids").combine_chunks()
    return column.flatten().to_numpy().astype(np.int64), column.offsets.to_numpy().astype(np.int64)


def pack(flat: np.ndarray, doc_starts: np.ndarray, max_len: int) -> dict[str, list[np.ndarray]]:
    """Cut the token stream into blocks; position_ids restart per document and per block."""
    index = np.arange(len(flat))
    doc_of = np.searchsorted(doc_starts, index, side="right") - 1
    block_start = (index // max_len) * max_len
    positions = index - np.maximum(doc_starts[doc_of], block_start)
    cuts = range(0, len(flat), max_len)
    return {
        "input_ids": [flat[i : i + max_len].astype(np.int32) for i in cuts],
        "position_ids": [positions[i : i + max_len].astype(np.int32) for i in cuts],
    }


@dataclass
class PretrainSummary:
    """What the packed data holds; logged at start-up and saved to output_dir."""

    files: int
    documents: int
    tokens: int
    blocks: int
    last_block_tokens: int
    max_seq_length: int
    invalid_lines: int
    cache_path: str
    cache_hit: bool

    def describe(self) -> str:
        return (
            f"{self.documents} documents in {self.files} file(s), {self.tokens} tokens (EOS included) packed into "
            f"{self.blocks} blocks of {self.max_seq_length} (last block {self.last_block_tokens} tokens, padded); "
            f"{self.invalid_lines} invalid lines skipped; cache {'reused' if self.cache_hit else 'built'}: "
            f"{self.cache_path}"
        )


class PackedData(NamedTuple):
    """Packed blocks, their summary, and the invalid lines that were skipped."""

    dataset: Dataset
    summary: PretrainSummary
    problems: list[Problem]


def _build_packed(path: str, tokenizer, max_len: int, num_workers: int, skip_invalid: bool) -> tuple[Dataset, dict]:
    read = read_jsonl(path, check_document)
    if read.problems and not skip_invalid:
        raise_problems(path, read.problems, SKIP_HINT)  # before the costly tokenization
    if not read.records:
        raise_problems(path, read.problems or [Problem(path, 1, "no valid documents")])
    flat, offsets = tokenize_documents([r["text"] for r in read.records], tokenizer, num_workers)
    blocks = pack(flat, offsets[:-1], max_len)
    meta = {
        "files": len(jsonl_files(path)),
        "documents": len(read.records),
        "tokens": int(len(flat)),
        "blocks": len(blocks["input_ids"]),
        "last_block_tokens": int(len(blocks["input_ids"][-1])),
        "problems": [list(p) for p in read.problems],
    }
    return Dataset.from_dict(blocks), meta


def load_packed(
    path: str, tokenizer, max_len: int, cache_dir: Path, num_workers: int = 1, skip_invalid: bool = False
) -> PackedData:
    """Packed blocks for `path`, from the cache when its key matches, else built and cached."""
    entry = cache_dir / f"pretrain-{cache_key(path, tokenizer, max_len)}"
    hit = (entry / META_FILE).is_file()
    if hit:
        dataset = load_from_disk(str(entry / "data"))
        meta = json.loads((entry / META_FILE).read_text())
    else:
        dataset, meta = _build_packed(path, tokenizer, max_len, num_workers, skip_invalid)
    problems = [Problem(*p) for p in meta["problems"]]
    if problems and not skip_invalid:
        raise_problems(path, problems, SKIP_HINT)
    if not hit:
        save_atomically(dataset, meta, entry)
        dataset = load_from_disk(str(entry / "data"))  # memory-mapped, like a cache hit
    summary = PretrainSummary(
        files=meta["files"],
        documents=meta["documents"],
        tokens=meta["tokens"],
        blocks=meta["blocks"],
        last_block_tokens=meta["last_block_tokens"],
        max_seq_length=max_len,
        invalid_lines=len(problems),
        cache_path=str(entry),
        cache_hit=hit,
    )
    return PackedData(dataset, summary, problems)


# ---------------------------------------------------------------- batches


def _segments(position_ids: torch.Tensor) -> torch.Tensor:
    """Per-token segment number: a new segment starts at every position 0."""
    return (position_ids == 0).cumsum(-1)


@dataclass
class PackedCollator:
    """Stacks packed blocks into a batch for the chosen `PackingMode`.

    A short last block is right-padded: pad tokens, IGNORE_INDEX labels and
    position_ids 0, 1, ... so that the padding is a segment of its own.
    """

    pad_token_id: int
    mode: PackingMode = PackingMode.POSITION_IDS
    mask_dtype: Optional[torch.dtype] = None
    """dtype of the 4D mask: None for a boolean mask (sdpa), else an additive float mask (eager)."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.mode == PackingMode.UNPACKED:
            return self._unpacked(features)
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        position_ids = torch.arange(longest).repeat(len(features), 1)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            position_ids[row, :n] = torch.as_tensor(f["position_ids"], dtype=torch.long)
            position_ids[row, n:] -= n
        labels = input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)
        for row, f in enumerate(features):
            labels[row, len(f["input_ids"]) :] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.mode == PackingMode.BLOCK_MASK:
            batch["attention_mask"] = self.block_mask(position_ids)
        return batch

    def block_mask(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(batch, 1, seq, seq) causal mask that only joins tokens of the same segment."""
        seg = _segments(position_ids)
        n = position_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal
        allowed = allowed[:, None]
        if self.mask_dtype is None:
            return allowed
        zero = torch.zeros((), dtype=self.mask_dtype)
        return torch.where(allowed, zero, torch.finfo(self.mask_dtype).min)

    def _unpacked(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows: list[list[int]] = []
        for f in features:
            ids, pos = list(f["input_ids"]), list(f["position_ids"])
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
            rows += [ids[a:b] for a, b in zip(starts, starts[1:], strict=False)]
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
