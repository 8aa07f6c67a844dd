"""Where SFT records come from: one `DatasetSpec` per dataset, read into located records.

A dataset is a local file or folder, or a Hub id:
- `.jsonl`: read line by line (component/data/jsonl.py); problems are `file:line`.
- `.json`: a JSON list of records (problems `file:index`, from 0), or JSON lines like `.jsonl`.
- `.parquet`, `.arrow` (a datasets Arrow file, as `save_to_disk` writes), and a `save_to_disk`
  folder (`datasets.load_from_disk`; a DatasetDict gives `split`, default train): problems
  are `path:index`, from 0.
- a folder: every file above found under it (sorted, recursive), each read on its own.
  A single file of another name is read as JSONL, as train_file always has been.
- anything else that is not a local path: `datasets.load_dataset(path, name=subset, split=split,
  revision=revision)`; offline (HF_DATASETS_OFFLINE=1) that reads datasets' own cache.

Rows of tabular sources share one schema, so a column a record lacks reads as null there;
those nulls are dropped before conversion, as a JSON line would not hold the key. `columns`
renames a source's columns to the format's keys before the record is converted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from component.config import AUTO_DATA_FORMAT
from component.data.jsonl import Checker, Problem, ReadResult, read_jsonl
from component.errors import DataError

DEFAULT_SPLIT = "train"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
# What `datasets.save_to_disk` writes into the folder: one Dataset, or a DatasetDict.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a `datasets` list (or `train_file`/`eval_file`, a one-entry list)."""

    path: str
    format: str = AUTO_DATA_FORMAT
    split: Optional[str] = None
    """The split of a Hub dataset or a saved DatasetDict; default train."""
    subset: Optional[str] = None
    """A Hub dataset's configuration (load_dataset's `name`)."""
    revision: Optional[str] = None
    weight: Optional[float] = None
    """mix_strategy interleave: the probability (normalised over the list) of drawing from this dataset."""
    num_samples: Optional[int] = None
    """mix_strategy concatenate: how many examples to take (component/data/mixing.py)."""
    columns: dict[str, str] = field(default_factory=dict)
    """source column -> the format's key, applied before conversion."""
    roles: dict[str, str] = field(default_factory=dict)
    """ShareGPT: the dataset's own role names -> sharegpt's (human, gpt, ...)."""
    train_on: Optional[Union[str, list[str]]] = None
    """What of each assistant turn is learned (component/data/supervision.py); default all of it."""

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> DatasetSpec:
        """A checked config entry (component/config/checks.py) as a spec."""
        known = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)


# ---------------------------------------------------------------- renaming columns


def rename_columns(obj: Any, columns: dict[str, str]) -> Any:
    """The record with its columns renamed, or a string naming a mapped column it lacks."""
    if not columns or not isinstance(obj, dict):
        return obj
    missing = [c for c in columns if c not in obj]
    if missing:
        keys = ", ".join(sorted(obj)) or "none"
        return (
            f"column(s) {', '.join(repr(c) for c in missing)} named in 'columns' not found (keys present: {keys}); "
            "fix the mapping or the record"
        )
    return {columns.get(k, k): v for k, v in obj.items()}


def _renaming(check: Checker, columns: dict[str, str]) -> Checker:
    def renamed(obj: Any):
        obj = rename_columns(obj, columns)
        return obj if isinstance(obj, str) else check(obj)

    return renamed


# ---------------------------------------------------------------- local files


def _drop_nulls(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}


def check_rows(name: str, rows: Iterator[Any], check: Checker) -> ReadResult:
    """Check indexed rows; problems are `name:index` (from 0)."""
    records, problems = [], []
    for index, row in enumerate(rows):
        result = check(_drop_nulls(row) if isinstance(row, dict) else row)
        if isinstance(result, str):
            problems.append(Problem(name, index, result))
        else:
            records.append(result)
    return ReadResult(records, problems)


def _read_json(file: Path, check: Checker) -> ReadResult:
    """A JSON list of records, or JSON lines (read exactly as .jsonl)."""
    try:
        text = file.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return read_jsonl(str(file), check)  # reports the bytes or the read error by line
    if not text.lstrip().startswith("["):
        return read_jsonl(str(file), check)
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return ReadResult([], [Problem(str(file), 1, f"invalid JSON list: {str(exc).split(';')[0]}")])
    if not isinstance(rows, list):  # a list that JSON-lines reading would take for one record
        return read_jsonl(str(file), check)
    if not rows:
        return ReadResult([], [Problem(str(file), 0, "the JSON list is empty")])
    return check_rows(str(file), iter(rows), check)


def _table_rows(table) -> Iterator[dict]:
    for batch in table.to_batches():
        yield from batch.to_pylist()


def _read_parquet(file: Path, check: Checker) -> ReadResult:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow's errors for a file that is not Parquet
        raise DataError(f"{file}: not a readable Parquet file: {exc}") from None
    return check_rows(str(file), _table_rows(table), check)


def _read_arrow(file: Path, check: Checker) -> ReadResult:
    from datasets import Dataset

    try:
        dataset = Dataset.from_file(str(file))
    except Exception as exc:  # pyarrow's errors for a file that is not an Arrow stream
        raise DataError(
            f"{file}: not a readable Arrow file (datasets' format, as save_to_disk writes): {exc}"
        ) from None
    return check_rows(str(file), iter(dataset), check)


def _split_of(loaded, name: str, split: Optional[str]):
    """One split of a DatasetDict (default train), or the Dataset itself."""
    if not hasattr(loaded, "keys"):
        return loaded
    wanted = split or DEFAULT_SPLIT
    if wanted not in loaded:
        raise DataError(f"{name}: no split {wanted!r}; it has {', '.join(loaded)}; set 'split'")
    return loaded[wanted]


def _read_saved(folder: Path, spec: DatasetSpec, check: Checker) -> ReadResult:
    from datasets import load_from_disk

    dataset = _split_of(load_from_disk(str(folder)), str(folder), spec.split)
    return check_rows(str(folder), iter(dataset), check)


READERS: dict[str, Callable[[Path, Checker], ReadResult]] = {
    ".jsonl": lambda file, check: read_jsonl(str(file), check),
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
}


def is_saved_dataset(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in SAVED_DATASET_FILES)


def source_files(path: str) -> list[Path]:
    """A file, or every readable file below a folder (sorted, recursive)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in FILE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {', '.join(FILE_SUFFIXES)} files")
        return files
    if not p.exists():
        raise DataError(f"{path}: data file not found")
    return [p]


# ---------------------------------------------------------------- the Hub


def is_local(path: str) -> bool:
    """A path meant as a local file: it exists, or it is written like a path (not `owner/name`)."""
    p = Path(path)
    return p.exists() or p.is_absolute() or path.startswith(".") or p.suffix in FILE_SUFFIXES or path.count("/") > 1


def _read_hub(spec: DatasetSpec, check: Checker) -> ReadResult:
    from datasets import load_dataset

    split = spec.split or DEFAULT_SPLIT
    try:
        dataset = load_dataset(spec.path, name=spec.subset, split=split, revision=spec.revision)
    except Exception as exc:  # datasets raises many kinds: not found, offline, gated, bad split
        raise DataError(
            f"{spec.path}: cannot load with datasets.load_dataset(name={spec.subset!r}, split={split!r}, "
            f"revision={spec.revision!r}): {type(exc).__name__}: {exc}"
        ) from None
    return check_rows(spec.path, iter(dataset), check)


# ---------------------------------------------------------------- one dataset


class SourceRead:
    """One piece of a dataset read with its own checker: a file, a saved folder or a Hub split."""

    def __init__(self, name: str, result: ReadResult):
        self.name = name
        self.records = result.records
        self.problems = result.problems


def read_source(spec: DatasetSpec, make_check: Callable[[], Checker]) -> list[SourceRead]:
    """Read every piece of `spec`, each with a fresh checker from `make_check` (format detection
    starts afresh per file), renaming columns first."""

    def check() -> Checker:
        return _renaming(make_check(), spec.columns)

    if not is_local(spec.path):
        return [SourceRead(spec.path, _read_hub(spec, check()))]
    if is_saved_dataset(Path(spec.path)):
        return [SourceRead(spec.path, _read_saved(Path(spec.path), spec, check()))]
    pieces = []
    for file in source_files(spec.path):
        result = READERS.get(file.suffix, READERS[".jsonl"])(file, check())  # other names: JSONL, as always
        pieces.append(SourceRead(str(file), result))
    return pieces
