"""The tokenized data of SFT and DPO, cached on disk, keyed by everything that decides it.

`cached(build, cache_dir, kind, result_type, summary_type)` wraps a task's build function (the
one build_splits / build_mixed_splits calls): the key is a hash of the data's contents (every local
file, read in full), the tokenizer (its model and special tokens), the template (a named template's
fields, or the chat template text and its end-of-turn token) and every other option the build
takes (max_seq_length, formats, columns, train_on, mixing, ...). A hit loads the saved dataset
(memory-mapped) and its summary; a miss builds, saves atomically, and loads the saved copy, so a
first run and a rerun train on the same files. Under torchrun the task runs this inside
`TrainingArguments.main_process_first()`: the first rank builds, the others wait and load.

A Hub dataset is keyed by its id, subset, split and revision; without a revision its contents could
change under the same key, so it is not cached (datasets keeps its own download cache). A revision
should be a commit: a branch name is taken as pinned. The data layer's code is in the key too
(`code_digest`), so no entry outlives a change to how data is read or rendered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from datasets import load_from_disk
from loguru import logger

from component.config import Config
from component.data.jsonl import Problem
from component.data.sources import DatasetSpec, is_local, is_saved_dataset, source_files

META_FILE = "meta.json"
DEFAULT_CACHE_DIR_NAME = "data_cache"
# Tokenizer settings that change no token id: left by earlier calls (padding=True, truncation=...).
CALL_STATE_KEYS = ("padding", "truncation")


def cache_root(config: Config) -> Path:
    """data_cache_dir, else data_cache/ next to output_dir (shared by the runs there)."""
    if config.data.data_cache_dir:
        return Path(config.data.data_cache_dir)
    return Path(config.output_dir).resolve().parent / DEFAULT_CACHE_DIR_NAME


@functools.cache
def code_digest() -> str:
    """Hash of the data layer's code: any change to how data is read, rendered or packed makes
    new keys, so an entry written by other code is never read (no version number to forget)."""
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Hash of what decides token ids and the text around them: the tokenizer model (without the
    padding/truncation state earlier calls leave on it) and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = {k: v for k, v in json.loads(backend.to_str()).items() if k not in CALL_STATE_KEYS}
        body = json.dumps(model, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.eos_token_id]
    return hashlib.sha256((body + json.dumps(specials)).encode()).hexdigest()


def save_atomically(dataset, meta: dict, target: Path) -> None:
    """Write to a fresh temporary sibling, then rename it into place: a reader never sees half an
    entry, and two writers (ranks, or nodes on a shared disk) never share a temporary folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    dataset.save_to_disk(str(tmp / "data"))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


def _file_digest(path: Path, digest) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)


def source_digest(spec: DatasetSpec) -> Optional[str]:
    """Hash of one dataset's contents and options; None where its contents cannot be pinned."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str).encode())
    if not is_local(spec.path):
        return digest.hexdigest() if spec.revision else None
    root = Path(spec.path)
    files = sorted(f for f in root.rglob("*") if f.is_file()) if is_saved_dataset(root) else source_files(spec.path)
    for file in files:
        digest.update((file.relative_to(root).as_posix() if root.is_dir() else file.name).encode() + b"\0")
        _file_digest(file, digest)
    return digest.hexdigest()


def template_digest(template) -> str:
    """A named template is its fields; 'auto' is the chat template text and its end-of-turn token."""
    return hashlib.sha256(repr(template).encode()).hexdigest()


def cache_key(source: Union[str, Sequence[DatasetSpec]], tokenizer, template, options: dict[str, Any]) -> Optional[str]:
    specs = [DatasetSpec(source)] if isinstance(source, str) else list(source)
    digests = [source_digest(spec) for spec in specs]
    if any(d is None for d in digests):
        return None
    parts = [
        code_digest(),
        *digests,
        tokenizer_digest(tokenizer),
        template_digest(template),
        json.dumps(options, sort_keys=True, default=str),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def cached(build: Callable, cache_dir: Path, kind: str, result_type: type, summary_type: Callable) -> Callable:
    """`build(source, template=, tokenizer=, **options)` with its result cached (see the module doc).
    `summary_type` rebuilds the summary from its saved dict."""

    def cached_build(source, *, template, tokenizer, **options):
        # Worker counts change how fast, not what: they stay out of the key.
        key = cache_key(source, tokenizer, template, {k: v for k, v in options.items() if k != "num_workers"})
        if key is None:
            logger.info(f"{kind} data not cached: a Hub dataset without a revision may change under the same name")
            return build(source, template=template, tokenizer=tokenizer, **options)
        entry = cache_dir / f"{kind}-{key}"
        if not (entry / META_FILE).is_file():
            result = build(source, template=template, tokenizer=tokenizer, **options)
            meta = {"summary": dataclasses.asdict(result.summary), "problems": [list(p) for p in result.problems]}
            save_atomically(result.dataset, meta, entry)
            logger.info(f"{kind} data cache built: {entry}")
        else:
            logger.info(f"{kind} data cache reused: {entry}")
        meta = json.loads((entry / META_FILE).read_text())
        problems = [Problem(*p) for p in meta["problems"]]
        return result_type(load_from_disk(str(entry / "data")), summary_type(meta["summary"]), problems)

    return cached_build
