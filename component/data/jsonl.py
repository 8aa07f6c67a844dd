"""Reading JSONL data files with `file:line` problem reports.

`read_jsonl(path, check)` parses each line and passes the object to `check`,
which returns either a record or a problem string. Problems are collected
for the whole file, so one run shows all of them at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Union

from component.errors import DataError, format_problems

# A checker returns the cleaned record, or a string describing the problem.
Checker = Callable[[Any], Union[Any, str]]


class Problem(NamedTuple):
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


class ReadResult(NamedTuple):
    records: list[Any]
    problems: list[Problem]


def jsonl_files(path: str) -> list[Path]:
    """A file, or every *.jsonl file below a folder (sorted, recursive)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
        if not files:
            raise DataError(f"{path}: folder holds no .jsonl files")
        return files
    if not p.exists():
        raise DataError(f"{path}: data file not found")
    return [p]


def read_jsonl(path: str, check: Checker) -> ReadResult:
    records: list[Any] = []
    problems: list[Problem] = []
    for file in jsonl_files(path):
        name = str(file)
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise DataError(f"{name}: cannot read: {exc.strerror}") from None
        if not raw.strip():
            problems.append(Problem(name, 1, "the file is empty"))
            continue
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(
                    Problem(name, lineno, f"not UTF-8 text (byte {exc.start}: {line[exc.start : exc.start + 1]!r})")
                )
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(Problem(name, lineno, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            except (ValueError, RecursionError) as exc:  # nested too deep, or an integer too long
                problems.append(Problem(name, lineno, f"invalid JSON: {str(exc).split(';')[0]}"))
                continue
            result = check(obj)
            if isinstance(result, str):
                problems.append(Problem(name, lineno, result))
            else:
                records.append(result)
    return ReadResult(records, problems)


def raise_problems(path: str, problems: list[Problem], hint: str = "") -> None:
    if problems:
        header = f"{path}: {len(problems)} invalid line{'s' if len(problems) != 1 else ''}"
        message = format_problems(header, [str(p) for p in problems])
        if hint:
            message += "\n" + hint
        raise DataError(message)
