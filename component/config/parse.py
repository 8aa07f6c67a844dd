"""Reading a config: a JSON file plus `--key value` flags, type-checked against the dataclasses.

Every problem is collected (unknown keys with a did-you-mean, values of the
wrong type) and returned as a list, so that one error names all of them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, Optional

from component.config.arguments import SOURCE_KEY, argument_classes
from component.errors import ConfigError

CONFIG_FILE_FLAG = "--train_args_file"


def suggest(name: str, known) -> Optional[str]:
    """The closest known name, if close: the one did-you-mean of the project (keys, templates, task types).

    Ours, not difflib's: difflib's ratio counts no swap of two letters, so for 'chatlm' it
    offers 'chatglm3' over 'chatml' (tests/test_config.py::test_bad_choices_and_unknown_template).
    """
    lowered = name.lower()
    best = min(sorted(known), key=lambda k: (_edit_distance(lowered, k.lower()), k), default=None)
    if best is None or _edit_distance(lowered, best.lower()) > max(1, len(name) // 3):
        return None
    return best


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, adjacent swaps."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _field_table() -> dict[str, tuple[type, dataclasses.Field]]:
    table: dict[str, tuple[type, dataclasses.Field]] = {}
    for cls in argument_classes():
        for f in dataclasses.fields(cls):
            if f.init:
                table.setdefault(f.name, (cls, f))
    return table


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ---------------------------------------------------------------- coercion


class _CoerceError(ValueError):
    pass


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return "one of " + ", ".join(repr(m.value) for m in tp)
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, from_cli: bool) -> Any:
    """Return `value` as type `tp`, or raise _CoerceError with what was expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (from_cli and value in ("None", "null") and type(None) in options):
            if type(None) in options:
                return None
        # Try the most specific types first so "3" becomes 3, not "3".
        ordered = sorted(options, key=lambda t: t is str)
        for option in ordered:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, from_cli)
            except _CoerceError:
                continue
        raise _CoerceError(" or ".join(_describe(o) for o in options if o is not type(None)))
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if from_cli and isinstance(value, str):
            value = _cli_json(value, "a JSON list") if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise _CoerceError(f"a list of {_describe(item_tp)}")
        return [_coerce(v, item_tp, from_cli) for v in value]
    if origin is dict or tp is dict:
        if from_cli and isinstance(value, str):
            value = _cli_json(value, "a JSON object")
        if not isinstance(value, dict):
            raise _CoerceError("a JSON object")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise _CoerceError("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _CoerceError("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _CoerceError("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _CoerceError("a string")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        if value in values:
            return value
        if isinstance(value, tp):
            return value.value
        raise _CoerceError(_describe(tp))
    return value


def _cli_json(text: str, expected: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # also too deep, or an integer too long to convert
        raise _CoerceError(expected) from None


def _type_error_text(value: Any, expected: str) -> str:
    return f"expected {expected}, got {json.dumps(value) if not isinstance(value, str) else repr(value)}"


# ---------------------------------------------------------------- reading


def split_cli(argv: list[str]) -> tuple[Optional[str], list[tuple[str, Any]], list[str]]:
    """Split argv into (config file, [(key, raw value)], problems)."""
    path: Optional[str] = None
    pairs: list[tuple[str, Any]] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            problems.append(f"command line: unexpected argument {arg!r}; flags look like --key value")
            i += 1
            continue
        key, eq, inline = arg[2:].partition("=")
        if eq:
            value: Any = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag switches a boolean on
            i += 1
        if "--" + key == CONFIG_FILE_FLAG:
            path = value
        else:
            pairs.append((key, value))
    return path, pairs, problems


def read_json(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found. Pass an existing file with {CONFIG_FILE_FLAG}.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}.") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}.") from None
    except (ValueError, RecursionError) as exc:  # nested too deep, or an integer too long to convert
        raise ConfigError(f"{path}: invalid JSON: {str(exc).split(';')[0]}.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the config must be a JSON object of key/value pairs.")
    return values


def _suggest(key: str, known: list[str]) -> str:
    close = suggest(key, known)
    return f" (did you mean '{close}'?)" if close else ""


def merge_sources(
    file_values: dict[str, Any], cli_pairs: list[tuple[str, Any]], source: str
) -> tuple[dict[str, Any], list[str]]:
    """Type-check and merge file values and CLI overrides; returns (values, problems)."""
    table = _field_table()
    hints = {cls: _type_hints(cls) for cls in argument_classes()}
    known = sorted(table)
    merged: dict[str, Any] = {}
    problems: list[str] = []
    # A run's saved train_args.json is a config too: the source it records is history, not a setting.
    sources = [(k, v, False, f"{source}: key '{k}'") for k, v in file_values.items() if k != SOURCE_KEY]
    sources += [(k, v, True, f"command line: --{k}") for k, v in cli_pairs]
    for key, value, from_cli, where in sources:
        if key not in table:
            problems.append(f"{where}: unknown key{_suggest(key, known)}")
            continue
        cls, f = table[key]
        tp = hints[cls][f.name]
        if f.metadata.get("const") is True:  # transformers' bare `--fsdp` means True: `fsdp: true` (saved so) too
            tp = typing.Union[tp, bool]
        try:
            merged[key] = _coerce(value, tp, from_cli)
        except _CoerceError as exc:
            problems.append(f"{where}: {_type_error_text(value, str(exc))}")
        except json.JSONDecodeError:
            problems.append(f"{where}: {_type_error_text(value, 'a JSON list')}")
    return merged, problems
