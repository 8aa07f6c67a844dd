"""Write LIMA as our SFT JSONL (`data/train.jsonl` by default).

    python script/prepare_lima.py                       # GAIR/lima from the hub (gated: needs your HF token)
    python script/prepare_lima.py --input ../shared/data/lima/train.jsonl
    python script/prepare_lima.py --input lima_train.jsonl --output data/train.jsonl

A local input may be in GAIR's format (`"conversations"`: alternating
human/assistant strings) or already in ours (`"conversation"`: a list of
{"human", "assistant"}). Odd rows are repaired and reported, never fatal:
a pair with an empty reply ends the conversation before it (the turns after
it lose their context), and a trailing question with no reply is dropped.
LIMA's licence is non-commercial: the output is for your own use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from component.errors import USER_ERROR_EXIT_CODE, DataError  # noqa: E402

HUB_DATASET = "GAIR/lima"
DEFAULT_OUTPUT = "data/train.jsonl"


class Converted(NamedTuple):
    record: Optional[dict]
    note: Optional[str]


def pairs_from_row(row: dict) -> list[tuple[str, str]]:
    if "conversations" in row:  # GAIR: ["q", "a", "q", "a", ...]
        turns = row["conversations"]
        return [(turns[i], turns[i + 1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]
    if "conversation" in row:
        return [(t.get("human"), t.get("assistant")) for t in row["conversation"]]
    raise DataError("row has neither 'conversations' (GAIR) nor 'conversation' (ours)")


def convert(row: dict) -> Converted:
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
    from datasets import load_dataset

    return load_dataset(HUB_DATASET, split=split)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="local JSONL (GAIR or our format); default: the hub dataset")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--split", default="train", help="hub split (train or test)")
    args = parser.parse_args(argv)
    try:
        if args.input and not Path(args.input).is_file():
            raise DataError(f"{args.input}: file not found")
        rows = read_local(Path(args.input)) if args.input else read_hub(args.split)
        written, notes = 0, []
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as out:
            for n, row in enumerate(rows, start=1):
                converted = convert(row)
                if converted.note:
                    notes.append(f"row {n}: {converted.note}")
                if converted.record:
                    out.write(json.dumps(converted.record, ensure_ascii=False) + "\n")
                    written += 1
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    for note in notes:
        print(f"repaired {note}", file=sys.stderr)
    print(f"wrote {written} conversations to {args.output} ({len(notes)} repaired or dropped rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
