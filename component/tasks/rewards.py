"""GRPO's reward functions: the built-ins, the user's own, and the checks every one passes.

The config names them as a list (`grpo_rewards`), each entry a built-in's name, or an object:

    {"name": "format", "weight": 1.0, "pattern": "^<think>.+?</think>\\s*\\S"}
    {"name": "accuracy", "mode": "numeric", "tolerance": 1e-6}
    {"name": "length", "target": 200}
    {"name": "json", "schema": {"type": "object", "required": ["city"]}}
    {"name": "tool_call"}
    {"function": "my_rewards:score", "weight": 0.5, "name": "score"}   (name: its label in the logs)

Every function is called as trl calls one: `f(prompts, completions, completion_ids, **columns)`, where
`prompts` are the rendered prompts, `completions` the decoded replies (special tokens removed),
`completion_ids` their token ids, and `columns` every column of the prompt data (`reference`, `tools`,
a line's own keys; component/data/prompts.py), one value per completion, plus trl's `trainer_state`.
It returns one float per completion.

Built-ins (each scores 0..1 but `length`, which is a penalty in -1..0):
- `format`: 1 where the reply matches `pattern` from its start (`re.match`, dot matches newlines).
- `accuracy`: 1 where the reply's final answer equals the reference: `exact` (the reply after any
  `</think>`, stripped), `numeric` (the last number in the reply within `tolerance` of the
  reference's), or `boxed` (the last `\\boxed{...}` in the reply, equal as text or as a number).
- `length`: -|tokens - target| / target, at least -1.
- `json`: 1 where the reply (after any `</think>`, inside a ```json fence or not) parses, and
  validates against `schema` when one is given.
- `tool_call`: 1 where the reply holds one or more calls (`<tool_call>{...}</tool_call>` blocks, or
  the reply itself a JSON call or list of calls), each naming one of the line's tools with
  arguments that validate against that tool's parameters.

User functions are imported by their dotted path only when the config names them (the current
folder is searched first, after the script's), and the file they came from is logged. A function
that raises, returns another number of values than completions, or returns None, NaN or a
non-number stops the run with a `RewardError` naming it: never a silent zero. Before any output
is written, each function is called once on the first prompts, with their reference answers as
completions, so a broken one fails then (`probe`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from loguru import logger

from component.errors import ConfigError, UserError

BUILTINS = ("format", "accuracy", "length", "json", "tool_call")
ACCURACY_MODES = ("exact", "numeric", "boxed")
DEFAULT_FORMAT_PATTERN = r"^<think>.+?</think>\s*\S"
DEFAULT_TOLERANCE = 1e-6
# Options each built-in reads (besides name and weight); anything else in its entry is refused.
OPTIONS = {
    "format": {"pattern"},
    "accuracy": {"mode", "tolerance", "reference_key"},
    "length": {"target"},
    "json": {"schema"},
    "tool_call": set(),
}
COMMON_KEYS = {"name", "weight", "function"}
REFERENCE_KEY = "reference"  # component/data/prompts.py's column of reference answers
PROBE_PROMPTS = 2


class RewardError(UserError):
    """A reward function failed, or gave something other than one number per completion."""


# ---------------------------------------------------------------- the config's list


@dataclass(frozen=True)
class RewardSpec:
    """One entry of `grpo_rewards`, checked."""

    name: str
    """The name in the logs and the report: the built-in's, or the function's path."""
    weight: float = 1.0
    builtin: Optional[str] = None
    function: Optional[str] = None
    options: dict = field(default_factory=dict)


def _entry_problems(i: int, entry: Any) -> list[str]:
    where = f"key 'grpo_rewards' entry {i}"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        return [f"{where}: expected a name or an object, got {entry!r}"]
    name, function = entry.get("name"), entry.get("function")
    if name is None and function is None:
        return [f"{where}: give 'name' (a built-in: {', '.join(BUILTINS)}) or 'function' ('module:name')"]
    if function is not None and name is not None and (not isinstance(name, str) or name in BUILTINS):
        return [f"{where}: 'name' labels a user function in the logs; {name!r} is a built-in's name, choose another"]
    problems = []
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        problems.append(f"{where}: 'weight' must be a number, got {weight!r}")
    if function is not None:
        if not isinstance(function, str) or not re.fullmatch(r"[\w.]+:[\w.]+", function):
            problems.append(f"{where}: 'function' must be 'module:name' (e.g. 'my_rewards:score'), got {function!r}")
        extra = sorted(set(entry) - COMMON_KEYS)
        if extra:
            problems.append(f"{where}: unknown key(s) {', '.join(extra)} for a user function (name it in your code)")
        return problems
    if name not in BUILTINS:
        return [f"{where}: unknown reward {name!r}; built-ins: {', '.join(BUILTINS)}, or 'function': 'module:name'"]
    extra = sorted(set(entry) - COMMON_KEYS - OPTIONS[name])
    if extra:
        allowed = ", ".join(sorted(OPTIONS[name])) or "none"
        problems.append(f"{where} ({name}): unknown option(s) {', '.join(extra)}; its options: {allowed}")
    return problems + _option_problems(f"{where} ({name})", name, entry)


def _option_problems(where: str, name: str, entry: dict) -> list[str]:
    if name == "format":
        pattern = entry.get("pattern", DEFAULT_FORMAT_PATTERN)
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            return [f"{where}: 'pattern' is not a regular expression: {exc}"]
    if name == "accuracy":
        mode, tolerance = entry.get("mode", "exact"), entry.get("tolerance", DEFAULT_TOLERANCE)
        if mode not in ACCURACY_MODES:
            return [f"{where}: 'mode' must be one of {', '.join(ACCURACY_MODES)}, got {mode!r}"]
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
            return [f"{where}: 'tolerance' must be a number >= 0, got {tolerance!r}"]
    if name == "length":
        target = entry.get("target")
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            return [f"{where}: 'target' (tokens) is required, a whole number >= 1; got {target!r}"]
    if name == "json" and "schema" in entry:
        return _schema_problems(where, entry["schema"])
    return []


def _schema_problems(where: str, schema: Any) -> list[str]:
    import jsonschema

    if not isinstance(schema, dict):
        return [f"{where}: 'schema' must be a JSON schema object, got {schema!r}"]
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        return [f"{where}: 'schema' is not a valid JSON schema: {exc.message}"]
    return []


def reward_list_problems(value: Any) -> list[str]:
    """Problems with `grpo_rewards` (config time: names, options, weights, paths' syntax)."""
    if not isinstance(value, list) or not value:
        return [
            "key 'grpo_rewards': GRPO needs one or more reward functions, e.g. "
            '[{"name": "format", "pattern": "^<think>.+?</think>"}, {"function": "my_rewards:score"}]'
        ]
    problems = [p for i, entry in enumerate(value) for p in _entry_problems(i, entry)]
    if not problems:
        names = [spec.name for spec in reward_specs(value)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            problems.append(f"key 'grpo_rewards': {', '.join(repeated)} listed twice; each reward once")
    return problems


def reward_specs(value: list) -> list[RewardSpec]:
    specs = []
    for entry in value:
        entry = {"name": entry} if isinstance(entry, str) else entry
        options = {k: v for k, v in entry.items() if k not in COMMON_KEYS}
        weight = float(entry.get("weight", 1.0))
        if "function" in entry:
            specs.append(RewardSpec(entry.get("name") or entry["function"], weight, function=entry["function"]))
        else:
            specs.append(RewardSpec(entry["name"], weight, builtin=entry["name"], options=options))
    return specs


def needs_reference(specs: Sequence[RewardSpec]) -> tuple[Optional[str], Optional[Callable[[str], Optional[str]]]]:
    """The column the accuracy reward compares with, and the check of each line's value; (None, None) where
    no accuracy reward is configured."""
    for spec in specs:
        if spec.builtin == "accuracy":
            return spec.options.get("reference_key", REFERENCE_KEY), reference_problem(
                spec.options.get("mode", "exact")
            )
    return None, None


# ---------------------------------------------------------------- built-ins

# A number as replies write one: 1,000 (commas in groups of three only: "1,2,3" is three numbers), -2.5,
# 1e-3, or 3/4 (a fraction is one number).
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")


def final_text(completion: str) -> str:
    """The reply after its reasoning: the text after the last `</think>`, stripped; "" where a `<think>` is
    never closed (a reply cut inside its reasoning has no answer: nothing in the reasoning counts)."""
    if "</think>" not in completion:
        return "" if "<think>" in completion else completion.strip()
    return completion.rsplit("</think>", 1)[-1].strip()


def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}`, braces balanced; None where there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def as_number(text: str) -> Optional[float]:
    """A number written as text: `1,000`, `-2.5`, `3/4`, `$12`, `50%` (as 50); None otherwise."""
    text = text.strip().strip("$").rstrip("%").replace(",", "").strip()
    fraction = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", text)
    if fraction:
        denominator = float(fraction.group(2))
        return float(fraction.group(1)) / denominator if denominator else None
    try:
        return float(text)
    except ValueError:
        return None


def last_number(text: str) -> Optional[float]:
    found = NUMBER.findall(text)
    return as_number(found[-1]) if found else None


def _same(answer: Optional[str], reference: str, tolerance: float) -> bool:
    if answer is None:
        return False
    a, b = as_number(answer), as_number(reference)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=0.0, abs_tol=tolerance)
    return re.sub(r"\s+", "", answer) == re.sub(r"\s+", "", reference)


GSM8K_ANSWER = "####"  # GSM8K's references end with "#### <answer>"


def expected_answer(reference: str, mode: str) -> Union[str, float, None]:
    """What a reply must give, read from a reference answer (its reasoning removed): for `exact` the
    text; for `boxed` the last `\\boxed{}`'s content, else the text after GSM8K's `####`, else the text; for
    `numeric` that as a number, or the last number of a reference written in words and digits. None
    where the reference gives nothing to compare with (numeric: no number, or LaTeX that is not one)."""
    text = final_text(reference)
    if mode == "exact":
        return text or None
    answer = last_boxed(text)
    if answer is None and GSM8K_ANSWER in text:
        answer = text.rsplit(GSM8K_ANSWER, 1)[-1].strip()
    answer = answer if answer is not None else text
    if mode == "boxed":
        return answer or None
    number = as_number(answer)
    if number is None and "\\" not in answer:  # prose with one final number; never LaTeX (\frac{1}{2} is not 2)
        number = last_number(answer)
    return number


def reference_problem(mode: str):
    """A check of one line's reference for the accuracy reward in `mode`: a message, or None where usable."""

    def check(reference: str) -> Optional[str]:
        if expected_answer(reference, mode) is None:
            what = "number" if mode == "numeric" else "answer"
            return f"the reference answer {reference[:60]!r} gives no {what} to compare with (accuracy mode {mode!r})"
        return None

    return check


def accuracy_score(completion: str, reference: str, mode: str, tolerance: float) -> float:
    reply = final_text(completion)
    expected = expected_answer(reference, mode)
    if expected is None or not reply:
        return 0.0
    if mode == "exact":
        return float(reply == expected)
    if mode == "numeric":
        got = last_number(reply)
        return float(got is not None and math.isclose(got, expected, rel_tol=0.0, abs_tol=tolerance))
    return float(_same(last_boxed(reply), expected, tolerance))


def json_value(completion: str) -> Any:
    """The reply parsed as JSON (inside a ```json fence or not); raises ValueError where it does not parse."""
    text = final_text(completion)
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    return json.loads(fenced.group(1) if fenced else text)


def json_score(completion: str, schema: Optional[dict]) -> float:
    try:
        value = json_value(completion)
    except ValueError:
        return 0.0
    if schema is None:
        return 1.0
    import jsonschema

    return float(jsonschema.validators.validator_for(schema)(schema).is_valid(value))


TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", flags=re.DOTALL)


def tool_calls_in(completion: str) -> Optional[list]:
    """The calls a reply makes: `<tool_call>` blocks (Hermes, Qwen), else the whole reply as one JSON call
    or a list of them (Llama 3.1); None where a call does not parse or there is none."""
    text = final_text(completion)
    blocks = TOOL_CALL_BLOCK.findall(text)
    if blocks and (
        TOOL_CALL_BLOCK.sub("", text).strip()  # prose, or an unterminated block, beside the calls
        or text.count("<tool_call>") != len(blocks)
        or text.count("</tool_call>") != len(blocks)
    ):
        return None
    try:
        calls = [json.loads(b) for b in blocks] if blocks else json.loads(text)
    except ValueError:
        return None
    calls = calls if isinstance(calls, list) else [calls]
    return calls if calls and all(isinstance(c, dict) for c in calls) else None


def tool_call_score(completion: str, tools: Optional[list]) -> float:
    import jsonschema

    calls = tool_calls_in(completion)
    if not calls or not tools:
        return 0.0
    functions = {t.get("function", t).get("name"): t.get("function", t) for t in tools if isinstance(t, dict)}
    for call in calls:
        function = functions.get(call.get("name"))
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return 0.0
        if function is None or not isinstance(arguments, dict):
            return 0.0
        schema = function.get("parameters") or {"type": "object"}
        if not jsonschema.validators.validator_for(schema)(schema).is_valid(arguments):
            return 0.0
    return 1.0


def builtin_reward(spec: RewardSpec) -> Callable[..., list[float]]:
    """The built-in `spec` names, as a trl reward function."""
    options = spec.options
    if spec.builtin == "format":
        pattern = re.compile(options.get("pattern", DEFAULT_FORMAT_PATTERN), flags=re.DOTALL)

        def score(prompts, completions, completion_ids, **columns):
            return [float(pattern.match(c) is not None) for c in completions]

    elif spec.builtin == "accuracy":
        mode, tolerance = options.get("mode", "exact"), float(options.get("tolerance", DEFAULT_TOLERANCE))
        key = options.get("reference_key", REFERENCE_KEY)

        def score(prompts, completions, completion_ids, **columns):
            references = columns.get(key)
            if references is None or any(r is None for r in references):
                raise ValueError(f"no reference answer (column '{key}') for a completion")
            return [accuracy_score(c, str(r), mode, tolerance) for c, r in zip(completions, references, strict=True)]

    elif spec.builtin == "length":
        target = options["target"]

        def score(prompts, completions, completion_ids, **columns):
            return [max(-1.0, -abs(len(ids) - target) / target) for ids in completion_ids]

    elif spec.builtin == "json":
        schema = options.get("schema")

        def score(prompts, completions, completion_ids, **columns):
            return [json_score(c, schema) for c in completions]

    else:

        def score(prompts, completions, completion_ids, **columns):
            tools = columns.get("tools") or [None] * len(completions)
            return [tool_call_score(c, t) for c, t in zip(completions, tools, strict=True)]

    return score


# ---------------------------------------------------------------- user functions


def load_user_function(path: str) -> tuple[Callable, str]:
    """The function at 'module:name' and the file it came from; ConfigError naming the path otherwise."""
    module_name, _, attribute = path.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # after the script's folder and the installed packages
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"key 'grpo_rewards': cannot import module {module_name!r} for reward function {path!r}: "
            f"{type(exc).__name__}: {exc} (it is looked up on sys.path and in {cwd})"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ConfigError(f"key 'grpo_rewards': {path!r}: module {module_name!r} has no function {attribute!r}")
    return target, str(Path(getattr(module, "__file__", "") or module_name).resolve())


# ---------------------------------------------------------------- checked calls


def decoded(columns: dict[str, Any], json_columns: Sequence[str]) -> dict[str, Any]:
    """The columns as the lines gave them: objects and lists back from their JSON text."""
    out = dict(columns)
    for key in json_columns:
        if key in out and isinstance(out[key], list):
            out[key] = [json.loads(v) if isinstance(v, str) else v for v in out[key]]
    return out


def checked_values(name: str, values: Any, expected: int) -> list[float]:
    """`values` as floats, one per completion; RewardError naming the function otherwise."""
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {name}: returned {type(values).__name__}, not a list of numbers") from None
    if len(values) != expected:
        raise RewardError(
            f"reward function {name}: returned {len(values)} values for {expected} completions; "
            "it must return one number per completion"
        )
    out = []
    for i, value in enumerate(values):
        if hasattr(value, "item"):  # a 0-d tensor or numpy number
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardError(
                f"reward function {name}: completion {i} got {value!r}; every completion needs a finite number "
                "(None or NaN would silently count as no reward)"
            )
        out.append(float(value))
    return out


class CheckedReward:
    """A reward function as trl calls it, with its name, its columns decoded, and its results checked."""

    def __init__(self, spec: RewardSpec, json_columns: Sequence[str] = (), listener: Optional[Callable] = None):
        self.spec = spec
        self.__name__ = spec.name  # trl's name for it: rewards/<name>/mean
        self.json_columns = tuple(json_columns)
        self.listener = listener
        if spec.builtin is not None:
            self.func, self.origin = builtin_reward(spec), f"built-in {spec.builtin}"
        else:
            self.func, origin = load_user_function(spec.function)
            self.origin = f"{spec.function} from {origin}"
            logger.info(f"reward function {spec.function}: loaded from {origin}")

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        try:
            values = self.func(
                prompts=prompts,
                completions=completions,
                completion_ids=completion_ids,
                **decoded(columns, self.json_columns),  # inside: a column that is not JSON names this function
            )
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(
                f"reward function {self.spec.name} ({self.origin}) raised {type(exc).__name__}: {exc}"
            ) from exc
        values = checked_values(self.spec.name, values, len(completions))
        if self.listener is not None:
            self.listener(self.spec.name, prompts, completions, values, columns.get("trainer_state"))
        return values


def probe(rewards: Sequence[CheckedReward], rows: list[dict], tokenizer) -> None:
    """Call every reward once on the first prompts, with their reference answers (or an empty reply)
    as completions, before anything is written: a function that raises or returns the wrong thing
    fails here, named, with exit status 2."""
    from transformers import TrainerState

    rows = rows[:PROBE_PROMPTS]
    completions = [row.get(REFERENCE_KEY) or "" for row in rows]
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}  # as trl passes them: prompt_ids too
    for reward in rewards:
        reward(
            [row["prompt"] for row in rows],
            completions,
            ids,
            **columns,
            trainer_state=TrainerState(),
            log_extra=lambda *a, **k: None,
            log_metric=lambda *a, **k: None,
        )
