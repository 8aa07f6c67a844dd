"""LIMA as our SFT JSONL: GAIR's format read, odd rows repaired and reported.

GAIR's rows hold `"conversations"`: alternating human/assistant strings. Ours
hold `"conversation"`: a list of {"human", "assistant"}. `gair_pairs` is the
one reading of GAIR's list, shared by `prepare_lima` (which writes a training
file) and the evaluation reader (which answers LIMA's test prompts, whose odd
count of turns ends in a prompt).

`prepare_lima` never fails on an odd row: a pair with an empty reply ends the
conversation before it (the turns after it lose their context), and a
trailing question with no reply is dropped. LIMA's licence is non-commercial.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional, TextIO, Union

from component.errors import DataError

HUB_DATASET = "GAIR/lima"
DEFAULT_OUTPUT = "data/train.jsonl"
GAIR_KEY = "conversations"  # ours is "conversation"


class Converted(NamedTuple):
    record: Optional[dict]
    note: Optional[str]


def gair_pairs(turns: Sequence) -> list[tuple[Any, Any]]:
    """GAIR's [human, assistant, human, ...] as (human, assistant) pairs; an odd count ends with (human, None)."""
    return [(turns[i], turns[i + 1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]


def from_gair(obj: dict) -> Union[dict, str]:
    """A GAIR row as ours, the last turn without "assistant" when the count is odd; or what is wrong with it."""
    turns = obj[GAIR_KEY]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        return f"'{GAIR_KEY}' must be a non-empty list of strings (GAIR's format)"
    pairs = gair_pairs(turns)
    return {"conversation": [{"human": h, **({"assistant": a} if a is not None else {})} for h, a in pairs]}


def pairs_from_row(row: dict) -> list[tuple[Any, Any]]:
    if GAIR_KEY in row:
        return gair_pairs(row[GAIR_KEY])
    if "conversation" in row:
        return [(t.get("human"), t.get("assistant")) for t in row["conversation"]]
    raise DataError(f"row has neither '{GAIR_KEY}' (GAIR) nor 'conversation' (ours)")


def convert(row: dict) -> Converted:
    """A row in our format, cut before its first unusable pair; the note says what was repaired."""
    kept: list[dict] = []
    note = None
    for i, (human, assistant) in enumerate(pairs_from_row(row)):
        if assistant is None:
            note = f"pair {i + 1}: question without a reply; dropped"
            break
        if not (isinstance(human, str) and human.strip() and isinstance(assistant, str) and assistant.strip()):
            note = f"pair {i + 1}: empty human or assistant text; conversation cut before it"
            break
        kept.append({"human": human, "assistant": assistant})
    if not kept:
        return Converted(None, (note or "no usable pair") + "; row dropped")
    record = {"conversation": kept}
    if row.get("source"):
        record = {"source": row["source"], **record}
    return Converted(record, note)


def read_local(path: Path) -> Iterable[dict]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None


def read_hub(split: str) -> Iterable[dict]:
    from datasets import load_dataset  # only here: the hub is read only when no local file is given

    return load_dataset(HUB_DATASET, split=split)


def write_converted(rows: Iterable[dict], output: str) -> tuple[int, list[str]]:
    """Write the usable rows to `output`; returns how many, and a note per repaired or dropped row."""
    written, notes = 0, []
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as out:
        for n, row in enumerate(rows, start=1):
            converted = convert(row)
            if converted.note:
                notes.append(f"row {n}: {converted.note}")
            if converted.record:
                out.write(json.dumps(converted.record, ensure_ascii=False) + "\n")
                written += 1
    return written, notes


def prepare_lima(
    input_path: Optional[str],
    output: str = DEFAULT_OUTPUT,
    split: str = "train",
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> None:
    """Convert a local file (GAIR's format or ours), else the hub's split; report to `out` and `err`."""
    out, err = out or sys.stdout, err or sys.stderr
    if input_path and not Path(input_path).is_file():
        raise DataError(f"{input_path}: file not found")
    rows = read_local(Path(input_path)) if input_path else read_hub(split)
    written, notes = write_converted(rows, output)
    for note in notes:
        err.write(f"repaired {note}\n")
    out.write(f"wrote {written} conversations to {output} ({len(notes)} repaired or dropped rows)\n")
