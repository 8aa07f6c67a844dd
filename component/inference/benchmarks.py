"""Benchmarks through lm-evaluation-harness, with the run's own chat template.

`run_benchmarks` scores a loaded model (a full or merged model, or a base plus
its adapter) on lm-eval tasks: built-in ones by name (mmlu, gsm8k, ifeval, ...)
and local YAML tasks over JSONL (data/eval_tasks/, and folders given with
`task_dirs`). The harness sees the model through `TemplateLM`: lm-eval's HFLM
with its chat-template hook answered by our template, so every prompt the
harness builds is the text `generation_prompt` (component/data/template.py)
puts before a reply in training, tokenized as training tokenizes it (no
special tokens added: the template writes BOS where its family wants one).
Generation also stops at the template's end-of-turn text, which the harness
would not know.

lm-eval is an optional dependency (pinned in requirements-dev.txt): it is
imported only inside the functions that need it, and `require_lm_eval` says
how to install it, so the rest of this module (task plans, comparisons, the
plot) works without it.

Local tasks are the harness's own YAML format. The harness reads a relative
`dataset_kwargs.data_files` from the working directory; here it is read
relative to the YAML, and every data line is checked before a model loads, so
a bad line is reported as `file:line: what` instead of a pyarrow traceback.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from loguru import logger

from component.data.jsonl import raise_problems, read_jsonl
from component.data.template import Message, TemplateError, generation_prompt
from component.errors import DataError, UserError
from component.inference.generation import LoadedModel

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
LOCAL_TASKS_DIR = Path(__file__).resolve().parents[2] / "data" / "eval_tasks"
RESULTS_FILE = "eval_results.json"
PLOT_FILE = "eval.png"
# lm-eval names each score "metric,filter" ("acc,none", "exact_match,strict-match") and its
# standard error "acc_stderr,none"; other keys of a task's results ("alias", "sample_len") are not scores.
METRIC_FILTER_SEPARATOR = ","
STDERR_MARK = "_stderr"
PLOT_SIZE_INCHES = (8, 4.5)
PLOT_DPI = 110
# Jinja fields a task reads from each record: "{{question}}", "{{ choices[0] }}", or a bare column name.
JINJA_FIELD = re.compile(r"\{\{\s*([A-Za-z_]\w*)")
BARE_FIELD = re.compile(r"[A-Za-z_]\w*")


class BenchmarkError(UserError):
    """A benchmark cannot run: lm-eval missing, an unknown task, a bad local task."""


def require_lm_eval() -> None:
    """Raise a BenchmarkError saying how to install lm-eval when it cannot be imported."""
    try:
        importlib.import_module("lm_eval")
    except ImportError:
        raise BenchmarkError(
            f"--tasks needs lm-evaluation-harness, an optional dependency: pip install {LM_EVAL_REQUIREMENT} "
            "(pinned in requirements-dev.txt, which script/setup.sh installs)"
        ) from None


# ---------------------------------------------------------------- local tasks


@dataclass(frozen=True)
class LocalTask:
    """One lm-eval YAML task over local data, with its data files resolved against the YAML's folder."""

    name: str
    yaml_path: Path
    config: dict[str, Any]
    """The YAML, with dataset_kwargs.data_files made absolute: what the harness is given."""
    data_files: tuple[Path, ...]


def _absolute_files(files: Any, folder: Path) -> Any:
    """data_files as datasets takes them (a path, a list, or split -> either), made absolute."""
    if isinstance(files, dict):
        return {split: _absolute_files(f, folder) for split, f in files.items()}
    if isinstance(files, list):
        return [_absolute_files(f, folder) for f in files]
    return str(folder / files) if isinstance(files, str) else files


def _flat_files(files: Any) -> list[Path]:
    if isinstance(files, dict):
        return [p for f in files.values() for p in _flat_files(f)]
    if isinstance(files, list):
        return [p for f in files for p in _flat_files(f)]
    return [Path(files)] if isinstance(files, str) else []


def read_local_task(path: Path) -> Optional[LocalTask]:
    """The task a YAML defines, or None for a YAML that is not a task (a group, another file)."""
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BenchmarkError(
            f"{path}: not a self-contained lm-eval task YAML ({str(exc).splitlines()[0]}); local tasks cannot "
            "use !function or include: put such tasks in lm-eval's own task folders"
        ) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        return None
    cfg = dict(cfg)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _absolute_files(kwargs["data_files"], path.parent.resolve())
        cfg["dataset_kwargs"] = kwargs
    return LocalTask(cfg["task"], path, cfg, tuple(_flat_files(kwargs.get("data_files"))))


def find_local_tasks(dirs: Sequence[Union[str, Path]]) -> dict[str, LocalTask]:
    """Every task defined by a YAML in these folders (recursive); the first folder wins a name."""
    tasks: dict[str, LocalTask] = {}
    for d in dirs:
        folder = Path(d)
        if not folder.is_dir():
            raise BenchmarkError(f"--task_dir {d}: not a folder")
        for path in sorted(folder.rglob("*.yaml")):
            task = read_local_task(path)
            if task is not None and task.name not in tasks:
                tasks[task.name] = task
    return tasks


def _fields(value: Any) -> list[str]:
    """The record fields a doc_to_* value reads."""
    if not isinstance(value, str):
        return []
    if BARE_FIELD.fullmatch(value.strip()):
        return [value.strip()]
    return JINJA_FIELD.findall(value)


def _choices_field(cfg: dict[str, Any]) -> Optional[str]:
    """The field holding a multiple-choice record's choices, when doc_to_choice is exactly one field."""
    fields = _fields(cfg.get("doc_to_choice"))
    return fields[0] if cfg.get("output_type") == "multiple_choice" and len(fields) == 1 else None


def record_checker(cfg: dict[str, Any]):
    """Checks one data line of a local task: the fields its doc_to_* read are there, and a
    multiple-choice record has at least two choices and a target among them (an index or the text)."""
    needed = list(
        dict.fromkeys(f for key in ("doc_to_text", "doc_to_target", "doc_to_choice") for f in _fields(cfg.get(key)))
    )
    choices_key = _choices_field(cfg)
    target = _fields(cfg.get("doc_to_target"))
    target_key = target[0] if len(target) == 1 else None

    def check(obj: Any) -> Union[dict, str]:
        if not isinstance(obj, dict):
            return f"expected a JSON object, got {type(obj).__name__}"
        missing = [k for k in needed if obj.get(k) is None]
        if missing:
            return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)} (the task reads {', '.join(needed)})"
        if choices_key:
            choices = obj[choices_key]
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
                return f"{choices_key!r} must be a list of at least two non-empty strings"
            answer = obj.get(target_key) if target_key else None
            if isinstance(answer, bool) or not (
                (isinstance(answer, int) and 0 <= answer < len(choices))
                or (isinstance(answer, str) and answer in choices)
            ):
                if target_key:
                    return f"{target_key!r} must be the index of a choice (0 to {len(choices) - 1}) or one of the choices, got {answer!r}"
        return obj

    return check


def check_local_data(task: LocalTask) -> None:
    """Every data file of a local task exists and every line is a record the task can read."""
    if not task.data_files:
        raise BenchmarkError(f"{task.yaml_path}: task {task.name!r} names no dataset_kwargs.data_files")
    check = record_checker(task.config)
    for path in task.data_files:
        if not path.is_file():
            raise DataError(f"{task.yaml_path}: task {task.name!r}: data file {path} not found")
        result = read_jsonl(str(path), check)
        raise_problems(str(path), result.problems, hint=f"(data of task {task.name!r}, {task.yaml_path})")


# ---------------------------------------------------------------- which tasks


@dataclass(frozen=True)
class TaskPlan:
    """The tasks to run, checked: what the harness is given, and whether its built-in tasks are needed."""

    names: tuple[str, ...]
    specs: tuple[Union[str, dict], ...]
    builtin: bool


def parse_task_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise BenchmarkError(f"--tasks {text!r}: an empty task name (give names separated by commas)")
    return list(dict.fromkeys(names))


@functools.cache
def builtin_task_names() -> frozenset[str]:
    """Every task, group and tag name lm-eval ships (indexing its YAML takes a few seconds)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def _unknown_task_message(name: str, known: Sequence[str], dirs: Sequence[Union[str, Path]]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown task {name!r}{hint}: not an lm-eval task, group or tag, nor a task in {', '.join(str(d) for d in dirs)}"


def plan_tasks(names: Sequence[str], task_dirs: Sequence[Union[str, Path]] = ()) -> TaskPlan:
    """Check the task names (local first, then lm-eval's own) and local data, before any model loads."""
    require_lm_eval()
    dirs = [*task_dirs, LOCAL_TASKS_DIR]
    local = find_local_tasks(dirs)
    others = [n for n in names if n not in local]
    known = builtin_task_names() if others else frozenset()
    unknown = [n for n in others if n not in known]
    if unknown:
        candidates = sorted(known | set(local))
        raise BenchmarkError("; ".join(_unknown_task_message(n, candidates, dirs) for n in unknown))
    for n in names:
        if n in local:
            check_local_data(local[n])
    specs = tuple(local[n].config if n in local else n for n in names)
    return TaskPlan(tuple(names), specs, builtin=bool(others))


# ---------------------------------------------------------------- the model, as the harness sees it


def harness_prompt(loaded: LoadedModel, chat_history: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """lm-eval's chat history rendered with our template. Without the generation prompt the last
    message is the start of the reply (a task's gen_prefix, "Answer:"), which the prompt continues."""
    messages = [Message(m["role"], m["content"]) for m in chat_history]
    try:
        if add_generation_prompt:
            return generation_prompt(loaded.template, loaded.tokenizer, messages)
        if not messages or messages[-1].role != "assistant":
            raise BenchmarkError("lm-eval asked to continue a reply, but the chat history does not end with one")
        return generation_prompt(loaded.template, loaded.tokenizer, messages[:-1]) + messages[-1].content
    except TemplateError as exc:
        raise BenchmarkError(f"template {loaded.template.name!r} cannot render an lm-eval prompt: {exc}") from None


@functools.cache
def _template_lm_class():
    """HFLM with our template: defined on first use, since lm-eval is imported only when asked for."""
    from lm_eval.models.huggingface import HFLM

    class TemplateLM(HFLM):
        """lm-eval's HFLM over an already loaded model, with the run's template as its chat template."""

        def __init__(self, loaded: LoadedModel, batch_size: int):
            self.loaded = loaded
            # add_bos_token=False: prompts are tokenized as in training, where the template writes any BOS.
            super().__init__(
                pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, add_bos_token=False
            )

        @property
        def tokenizer_name(self) -> str:  # keys lm-eval's request cache
            return f"{self.loaded.name}|{self.loaded.template.name}".replace("/", "__")

        def chat_template(self, chat_template: Union[bool, str] = False) -> str:
            return f"finetune-toolkit template {self.loaded.template.name!r}"

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return harness_prompt(self.loaded, chat_history, add_generation_prompt)

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # HFLM moves the context's trailing whitespace into the continuation, so that a choice
            # " Paris" after "Answer:" keeps its space. A chat prompt ends with its generation
            # prompt ("<|im_start|>assistant\n"), whose newline is prompt, not reply: training never
            # learns it. So the continuation is scored as exactly the tokens after the prompt's,
            # as the reply is learned; only where the two merge into one token does HFLM's split stay.
            whole = self.tok_encode(context + continuation)
            prompt = self.tok_encode(context)
            if whole[: len(prompt)] == prompt and len(whole) > len(prompt):
                return prompt, whole[len(prompt) :]
            return super()._encode_pair(context, continuation)

        def tok_decode(self, tokens, skip_special_tokens: bool = False) -> str:
            # Keep the end-of-turn token in the text, so that the reply is cut there (a batch
            # generates on past one row's end until every row has ended).
            return super().tok_decode(tokens, skip_special_tokens=False)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            stop = self.loaded.template.stop_text(self.loaded.tokenizer)
            for request in requests:
                context, kwargs = request.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                request.arguments = (
                    context,
                    {**kwargs, "until": [*until, stop] if stop and stop not in until else until},
                )
            return super().generate_until(requests, disable_tqdm)

        def get_model_info(self) -> dict:  # HFLM's asks the Hub for a commit hash
            return {
                "model": self.loaded.name,
                "template": self.loaded.template.name,
                "model_num_parameters": sum(p.numel() for p in self.loaded.model.parameters()),
            }

    return TemplateLM


def template_lm(loaded: LoadedModel, batch_size: int):
    """The loaded model as an lm-eval LM that renders every prompt with our template."""
    require_lm_eval()
    return _template_lm_class()(loaded, batch_size)


# ---------------------------------------------------------------- running


@dataclass
class BenchmarkRun:
    """One model's scores: metric -> value per task, as lm-eval names them ("acc,none")."""

    model: str
    results: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, Any]]
    examples: dict[str, int]
    samples: dict[str, list[dict]] = field(default_factory=dict)
    """lm-eval's per-document records (arguments, responses, scores); not written to eval_results.json."""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "results": self.results, "stderr": self.stderr, "examples": self.examples}


def _split_metrics(task_results: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    metrics, stderr = {}, {}
    for key, value in task_results.items():
        if METRIC_FILTER_SEPARATOR not in key:  # "alias", "sample_len": about the task, not scores
            continue
        name = key.split(METRIC_FILTER_SEPARATOR)[0]
        if name.endswith(STDERR_MARK):
            stderr[key.replace(STDERR_MARK, "", 1)] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
    return metrics, stderr


def run_benchmarks(
    loaded: LoadedModel,
    plan: TaskPlan,
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 8,
) -> BenchmarkRun:
    """Score the model on the planned tasks with lm-eval's simple_evaluate, chat template applied
    (few-shot examples as earlier turns of the conversation, as the model saw conversations)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logger.info(f"{loaded.name}: lm-eval tasks {', '.join(plan.names)} with template {loaded.template.name}")
    out = simple_evaluate(
        model=template_lm(loaded, batch_size),
        tasks=list(plan.specs),
        num_fewshot=num_fewshot,
        limit=limit,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        log_samples=True,
        task_manager=TaskManager(include_defaults=plan.builtin),
    )
    results, stderr, examples = {}, {}, {}
    for task, task_results in out["results"].items():
        results[task], stderr[task] = _split_metrics(task_results)
        n = out.get("n-samples", {}).get(task, {})
        if n:
            examples[task] = int(n.get("effective", n.get("original", 0)))
    return BenchmarkRun(loaded.name, results, stderr, examples, out.get("samples", {}))


# ---------------------------------------------------------------- before and after


def deltas(tuned: BenchmarkRun, base: BenchmarkRun) -> dict[str, dict[str, float]]:
    """Fine-tuned minus baseline, for every metric both have."""
    return {
        # Rounded: 0.35 - 0.25 is 0.1, not 0.09999999999999998.
        task: {m: round(v - base.results[task][m], 10) for m, v in metrics.items() if m in base.results.get(task, {})}
        for task, metrics in tuned.results.items()
        if task in base.results
    }


def comparison(tuned: BenchmarkRun, base: Optional[BenchmarkRun], **settings: Any) -> dict[str, Any]:
    """What eval_results.json holds: the settings, the fine-tuned scores, and the baseline's with the deltas."""
    out: dict[str, Any] = {**settings, **tuned.to_dict()}
    if base is not None:
        out["baseline"] = base.to_dict()
        out["deltas"] = deltas(tuned, base)
    return out


def _number(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def delta_table(tuned: BenchmarkRun, base: Optional[BenchmarkRun]) -> str:
    """A Markdown table: task, metric, fine-tuned, and the baseline and delta when there is one."""
    head = ["task", "metric", "fine-tuned"] + (["baseline", "delta"] if base else [])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    changes = deltas(tuned, base) if base else {}
    for task, metrics in tuned.results.items():
        for metric, value in metrics.items():
            cells = [task, metric, _number(value)]
            if base:
                before = base.results.get(task, {}).get(metric)
                change = changes.get(task, {}).get(metric)
                cells += [_number(before), "-" if change is None else f"{change:+.4f}"]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def short_name(model: str) -> str:
    """A model's folder or file name; for "BASE + ADAPTER", the adapter's."""
    return Path(model.split(" + ")[-1]).name


def plot_comparison(tuned: BenchmarkRun, base: Optional[BenchmarkRun], path: Path) -> Path:
    """Bars per task and metric: the baseline beside the fine-tuned model (Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"{t}\n{m}" for t, ms in tuned.results.items() for m in ms]
    after = [v for ms in tuned.results.values() for v in ms.values()]
    fig = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(labels)))
    width = 0.4 if base else 0.6
    if base:
        before = [base.results.get(t, {}).get(m, float("nan")) for t, ms in tuned.results.items() for m in ms]
        ax.bar([x - width / 2 for x in xs], before, width, label=f"baseline: {short_name(base.model)}", color="#9aa5b1")
        bars = ax.bar(
            [x + width / 2 for x in xs], after, width, label=f"fine-tuned: {short_name(tuned.model)}", color="#2b6cb0"
        )
        for bar, b, a in zip(bars, before, after, strict=True):
            if not math.isnan(b):
                ax.annotate(
                    f"{a - b:+.2f}", (bar.get_x() + bar.get_width() / 2, a), ha="center", va="bottom", fontsize=8
                )
    else:
        ax.bar(xs, after, width, label=f"fine-tuned: {short_name(tuned.model)}", color="#2b6cb0")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, max([1.0, *after]) * 1.1)
    ax.set_title("lm-eval scores" + (", fine-tuned against baseline (delta above the bars)" if base else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_results(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")  # then renamed: a reader never sees half a file
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    return path
