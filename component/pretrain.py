"""The pretrain task: raw text, packed into blocks, cached, isolated per document.

Data: a JSONL file, or every *.jsonl below a folder, one `{"text": ...}` per
line (other keys are ignored); bad lines are reported as `file:line`.

Packing: each document is tokenized without special tokens and followed by
EOS; the documents are concatenated and cut into blocks of `max_seq_length`.
The last block keeps its remainder (padded in the batch, never dropped).
`position_ids` restart at 0 at every document start and every block start,
and the label of every position-0 token is IGNORE_INDEX, so no token learns
to predict across a boundary. How attention is kept inside a document is
chosen per model (`PackingMode`), after a check on the loaded model: the
model's own handling of restarting position_ids (attention_mask None, no
cache), else a block-diagonal 4D mask, else one row per document.

Cache: the packed blocks are saved under `data_cache_dir` (default:
`data_cache/` next to `output_dir`), keyed by the files' contents, the
tokenizer and `max_seq_length`; any change builds a new entry. The main
process builds first; the other ranks then read what it wrote.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from datasets import Dataset, load_from_disk
from loguru import logger

from component.config import VALIDATORS, Config
from component.jsonl import Problem, jsonl_files, raise_problems, read_jsonl
from component.model_types import model_type_info
from component.sft import TaskData, build_splits
from component.sft_data import SKIP_HINT
from component.template import IGNORE_INDEX

# Bump when the packed layout changes, so old cache entries are never read.
CACHE_FORMAT_VERSION = 1
DEFAULT_CACHE_DIR_NAME = "data_cache"
CACHE_META_FILE = "pretrain_meta.json"
# The probe that checks document isolation on the loaded model: two short
# random documents, compared packed and alone.
PROBE_LENGTHS = (7, 5)
PROBE_SEED = 1234
# Largest |logit difference| accepted as "the same", relative to the largest |logit| (at least 1), by
# dtype: kernels round differently for different lengths (SmolLM2 in fp32: ~1e-4 on logits of ~20),
# while attending across a boundary moves logits by far more.
ISOLATION_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


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


def tokenizer_digest(tokenizer) -> str:
    """Hash of what decides token ids: the tokenizer model and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token, tokenizer.eos_token_id])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(path: str, tokenizer, max_len: int) -> str:
    parts = [str(CACHE_FORMAT_VERSION), files_digest(path), tokenizer_digest(tokenizer), str(max_len)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def cache_root(config: Config) -> Path:
    if config.data.data_cache_dir:
        return Path(config.data.data_cache_dir)
    return Path(config.training.output_dir).resolve().parent / DEFAULT_CACHE_DIR_NAME


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


def _save_atomically(dataset: Dataset, meta: dict, target: Path) -> None:
    """Write to a temporary sibling, then rename: readers never see half an entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    dataset.save_to_disk(str(tmp / "data"))
    (tmp / CACHE_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


def load_packed(
    path: str, tokenizer, max_len: int, cache_dir: Path, num_workers: int = 1, skip_invalid: bool = False
) -> PackedData:
    """Packed blocks for `path`, from the cache when its key matches, else built and cached."""
    entry = cache_dir / f"pretrain-{cache_key(path, tokenizer, max_len)}"
    hit = (entry / CACHE_META_FILE).is_file()
    if hit:
        dataset = load_from_disk(str(entry / "data"))
        meta = json.loads((entry / CACHE_META_FILE).read_text())
    else:
        dataset, meta = _build_packed(path, tokenizer, max_len, num_workers, skip_invalid)
    problems = [Problem(*p) for p in meta["problems"]]
    if problems and not skip_invalid:
        raise_problems(path, problems, SKIP_HINT)
    if not hit:
        _save_atomically(dataset, meta, entry)
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


def build_data(config: Config, tokenizer) -> TaskData:
    cache_dir = cache_root(config)
    args = dict(
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        cache_dir=cache_dir,
        num_workers=config.data.tokenize_num_workers,
        skip_invalid=config.data.skip_invalid_examples,
    )
    # Under DDP the main process builds the cache; the others wait, then read it.
    with config.training.main_process_first(desc="pretrain data"):
        train, eval_ds = build_splits(config, load_packed, **args)
    collator = PackedCollator(tokenizer.pad_token_id)  # the mode is chosen once the model is loaded
    return TaskData(train.dataset, eval_ds, collator, train.summary, train.problems)


def build_trainer(config: Config, model, tokenizer, data: TaskData):
    from transformers.integrations import is_deepspeed_zero3_enabled

    from component.runner import build_trainer as build_default_trainer  # runner imports this module

    # A cache makes the model build its own mask and ignore packed position_ids.
    model.config.use_cache = False
    # Under ZeRO-3 the weights are sharded before the Trainer exists: trust the model type's entry.
    collator = choose_collator(model, data.collator.pad_token_id, verify=not is_deepspeed_zero3_enabled())
    return build_default_trainer(config, model, tokenizer, data._replace(collator=collator))


def check_pretrain_values(values: dict[str, Any]) -> list[str]:
    cache = values.get("data_cache_dir")
    if values.get("task_type") == "pretrain" and cache and Path(cache).is_file():
        return [f"key 'data_cache_dir': {cache!r} is a file; give a folder"]
    return []


VALIDATORS.append(check_pretrain_values)
