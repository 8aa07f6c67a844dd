"""The DPO task: preference pairs, rendered like SFT, trained with trl's DPOTrainer.

Data, JSONL, one pair per line, in either form:
- `{"chosen": [messages], "rejected": [messages]}`: role/content lists with
  an optional leading system message, the same history, and a different
  last assistant message;
- `{"prompt": str, "chosen": str, "rejected": str}` (optional `"system"`):
  one user turn and two replies.
Lines are checked (the history really shared, roles alternating, the
template able to render it) and problems reported as `file:line`.

Tokens: each side is rendered with the SFT template code and tokenized as one
string, exactly as SFT does; the completion is the assistant reply plus its
end-of-turn token, the prompt everything before it (the generation prompt).
`truncate_pair` is the one place pairs are cut: the prompt from the left,
down to `max_prompt_length`, then the replies from the right. A pair that
cannot keep a difference between its replies is dropped and counted.

Training: trl's DPOTrainer on the pre-tokenized pairs. The reference is a
frozen copy in full mode, the base with the adapter disabled under LoRA and
QLoRA. Every TrainingArguments value comes from our config, so trl's own
defaults (bf16, gradient checkpointing, lr 1e-6) never apply silently.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

from datasets import Dataset
from transformers import TrainingArguments

from component.config import VALIDATORS, Config
from component.jsonl import Problem, raise_problems, read_jsonl
from component.report import observe_batch
from component.sft import TaskData, build_splits
from component.sft_data import SKIP_HINT
from component.template import (
    IGNORE_INDEX,
    Message,
    Rendered,
    Template,
    TemplateError,
    encode,
    render,
    resolve_template,
)
from component.trainer import default_callbacks

ROLES = ("system", "user", "assistant")
# trl 1.16's DPO loss types (DPOTrainer._compute_loss).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


class Pair(NamedTuple):
    """A checked preference pair: the shared history (ending with a user turn) and two replies."""

    history: list[Message]
    chosen: str
    rejected: str


# ---------------------------------------------------------------- checking


def _messages(value: Any, key: str) -> Union[list[Message], str]:
    if not isinstance(value, list) or not value:
        return f'\'{key}\' must be a non-empty list of {{"role": ..., "content": ...}} messages'
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            return f"{key}[{i}]: expected an object with exactly 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"{key}[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return f"{key}[{i}].content: expected non-empty text"
        out.append(Message(m["role"], m["content"]))
    return out


def _pair_from_messages(obj: dict) -> Union[Pair, str]:
    chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
    for side in (chosen, rejected):
        if isinstance(side, str):
            return side
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1].role != "assistant":
            return f"'{key}' must end with an assistant message, got {side[-1].role!r}"
    if len(chosen) != len(rejected):
        return (
            f"'chosen' has {len(chosen)} messages and 'rejected' {len(rejected)}; they must share the history "
            "and differ only in the last assistant message"
        )
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True)):
        if a != b:
            return (
                f"message {i} ({a.role}) differs between 'chosen' and 'rejected'; only the last assistant "
                "message may differ"
            )
    if chosen[-1].content == rejected[-1].content:
        return "the chosen and rejected replies are identical"
    return Pair(chosen[:-1], chosen[-1].content, rejected[-1].content)


def _pair_from_strings(obj: dict) -> Union[Pair, str]:
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            return f"'{key}' must be non-empty text"
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        return f"'system' must be a string, got {type(system).__name__}"
    if obj["chosen"] == obj["rejected"]:
        return "the chosen and rejected replies are identical"
    history = ([Message("system", system)] if system else []) + [Message("user", obj["prompt"])]
    return Pair(history, obj["chosen"], obj["rejected"])


def check_pair(obj: Any) -> Union[Pair, str]:
    """A clean Pair, or a string naming what is wrong."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        return f"missing key(s) {', '.join(missing)} (keys present: {', '.join(sorted(obj)) or 'none'})"
    if "prompt" in obj:
        extra = set(obj) - {"prompt", "chosen", "rejected", "system", "id", "source"}
        return f"unknown key(s) {', '.join(sorted(extra))}" if extra else _pair_from_strings(obj)
    extra = set(obj) - {"chosen", "rejected", "id", "source"}
    if extra:
        return f"unknown key(s) {', '.join(sorted(extra))}; expected chosen and rejected message lists"
    return _pair_from_messages(obj)


def pair_checker(template: Template, tokenizer):
    """check_pair, plus a render with the template, so that template errors also name their line."""

    def check(obj: Any) -> Union[Pair, str]:
        pair = check_pair(obj)
        if isinstance(pair, str):
            return pair
        try:
            render(template, tokenizer, [*pair.history, Message("assistant", pair.chosen)])
        except TemplateError as exc:
            return str(exc)
        return pair

    return check


# ---------------------------------------------------------------- tokenizing


class Tokens(NamedTuple):
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _side(template: Template, tokenizer, history: list[Message], reply: str) -> tuple[list[int], int]:
    """Token ids of history + reply up to its end-of-turn, and where the reply's tokens start."""
    rendered = render(template, tokenizer, [*history, Message("assistant", reply)])
    start, end = rendered.spans[-1]
    # The text after the end-of-turn token (the separator) is not generated, so not part of the reply.
    ids, labels = encode(tokenizer, Rendered(rendered.text[:end], [(start, end)]))
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids, first


def tokenize_pair(pair: Pair, template: Template, tokenizer) -> Tokens:
    """Prompt and completions as SFT tokenizes them; the prompt is the tokens both sides share."""
    ids_c, start_c = _side(template, tokenizer, pair.history, pair.chosen)
    ids_r, start_r = _side(template, tokenizer, pair.history, pair.rejected)
    # Both sides render the same prompt text; a token merging across the prompt/reply boundary can
    # still split it differently, so the prompt is the longest common token prefix.
    shared = 0
    limit = min(start_c, start_r)
    while shared < limit and ids_c[shared] == ids_r[shared]:
        shared += 1
    return Tokens(ids_c[:shared], ids_c[shared:], ids_r[shared:])


def truncate_pair(tokens: Tokens, max_len: int, max_prompt_len: int) -> tuple[Optional[Tokens], bool]:
    """The one place pairs are cut. Returns (tokens or None when the pair must be dropped, was cut)."""
    prompt, chosen, rejected = tokens
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer <= max_len:
        return tokens, False
    keep = min(len(prompt), max(max_prompt_len, max_len - longer))
    prompt = prompt[len(prompt) - keep :]
    budget = max_len - len(prompt)
    chosen, rejected = chosen[:budget], rejected[:budget]
    if budget < 1 or chosen == rejected:
        return None, True
    return Tokens(prompt, chosen, rejected), True


@dataclass
class DPOSummary:
    """What the preference data holds after tokenization; logged at start-up."""

    pairs: int
    prompt_tokens: int
    chosen_tokens: int
    rejected_tokens: int
    truncated: int
    dropped_after_truncation: int
    invalid_lines: int

    def describe(self) -> str:
        return (
            f"{self.pairs} pairs; tokens: {self.prompt_tokens} prompt, {self.chosen_tokens} chosen, "
            f"{self.rejected_tokens} rejected; {self.truncated} truncated, {self.dropped_after_truncation} dropped "
            f"(no difference left after truncation), {self.invalid_lines} invalid lines skipped"
        )


class PreferenceData(NamedTuple):
    dataset: Dataset
    summary: DPOSummary
    problems: list[Problem]


def build_preference_dataset(
    path: str, template: Template, tokenizer, max_len: int, max_prompt_len: int, skip_invalid: bool = False
) -> PreferenceData:
    read = read_jsonl(path, pair_checker(template, tokenizer))
    if read.problems and not skip_invalid:
        raise_problems(path, read.problems, SKIP_HINT)
    rows: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    truncated = dropped = 0
    for pair in read.records:
        tokens, cut = truncate_pair(tokenize_pair(pair, template, tokenizer), max_len, max_prompt_len)
        truncated += cut
        if tokens is None:
            dropped += 1
            continue
        for key, value in zip(rows, tokens, strict=True):
            rows[key].append(value)
    if not rows["prompt_ids"]:
        raise_problems(path, read.problems + [Problem(path, 0, f"no pair fits max_seq_length={max_len}")])
    summary = DPOSummary(
        pairs=len(rows["prompt_ids"]),
        prompt_tokens=sum(map(len, rows["prompt_ids"])),
        chosen_tokens=sum(map(len, rows["chosen_ids"])),
        rejected_tokens=sum(map(len, rows["rejected_ids"])),
        truncated=truncated,
        dropped_after_truncation=dropped,
        invalid_lines=len(read.problems),
    )
    return PreferenceData(Dataset.from_dict(rows), summary, read.problems)


def build_data(config: Config, tokenizer) -> TaskData:
    template = resolve_template(config.data.template_name, tokenizer)  # as SFT: named, or the tokenizer's own
    args = dict(
        template=template,
        tokenizer=tokenizer,
        max_len=config.data.max_seq_length,
        max_prompt_len=config.data.max_prompt_length,
        skip_invalid=config.data.skip_invalid_examples,
    )
    train, eval_ds = build_splits(config, build_preference_dataset, **args)
    return TaskData(train.dataset, eval_ds, None, train.summary, train.problems)


# ---------------------------------------------------------------- training


def dpo_args(config: Config):
    """trl's DPOConfig holding every TrainingArguments value of ours, plus the DPO options."""
    from trl import DPOConfig

    training = config.training
    values = {f.name: getattr(training, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    method = config.method
    return DPOConfig(
        **values,
        beta=method.dpo_beta,
        loss_type=list(method.dpo_loss_type),
        loss_weights=method.dpo_loss_weights,
        label_smoothing=method.dpo_label_smoothing,
        precompute_ref_log_probs=method.dpo_precompute_ref_log_probs,
        max_length=config.data.max_seq_length,  # pairs already fit: trl's collator never cuts
        dataset_num_proc=config.data.tokenize_num_workers,
        trust_remote_code=config.model.trust_remote_code,
    )


def frozen_copy(config: Config, model):
    """The full-mode reference: the starting model, frozen."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from component.model import load_base_model, torch_dtype

    if is_deepspeed_zero3_enabled():
        # A ZeRO-3 model holds only this rank's shards: load the starting weights again instead.
        ref = load_base_model(config.model, torch_dtype(config))
    else:
        ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def _trainer_class():
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer

    class PreferenceTrainer(DPOTrainer):
        """trl's DPOTrainer on our pre-tokenized pairs, with the adapter-disabled reference under LoRA."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Given a PeftModel, trl keeps a copy of the adapter as "ref". Ours is always freshly
            # initialized (B = 0), so the base with the adapter disabled is the same reference,
            # with no copy held; trl uses that when no "ref" adapter exists.
            if is_peft_model(self.model) and "ref" in self.model.peft_config:
                self.model.delete_adapter("ref")
                self.model.set_adapter("default")

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Our pairs are rendered with the SFT template and truncated already; trl would
            # re-tokenize them as plain text and append an EOS the template may not use.
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def training_step(self, model, inputs, *args, **kwargs):
            observe_batch(self.callback_handler.callbacks, inputs)  # token counts for report.json
            return super().training_step(model, inputs, *args, **kwargs)

        def _send_telemetry(self):
            """No usage ping: we never contact a remote service unasked."""

    return PreferenceTrainer


def build_trainer(config: Config, model, tokenizer, data: TaskData):
    args = dpo_args(config)
    ref_model = None
    if config.method.train_mode == "full" and not args.precompute_ref_log_probs:
        ref_model = frozen_copy(config, model)
    return _trainer_class()(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=default_callbacks(),
    )


def check_dpo_values(values: dict[str, Any]) -> list[str]:
    if values.get("task_type") != "dpo":
        return []
    problems = []
    if values.get("dpo_beta", 0.1) <= 0:
        problems.append(f"key 'dpo_beta': must be positive, got {values['dpo_beta']}")
    smoothing = values.get("dpo_label_smoothing", 0.0)
    if not 0.0 <= smoothing < 0.5:
        problems.append(f"key 'dpo_label_smoothing': must be in [0, 0.5), got {smoothing}")
    losses = values.get("dpo_loss_type", ["sigmoid"])
    unknown = [x for x in losses if x not in DPO_LOSS_TYPES]
    if unknown or not losses:
        problems.append(
            f"key 'dpo_loss_type': unknown {unknown or 'empty list'}; one or more of {', '.join(DPO_LOSS_TYPES)}"
        )
    weights = values.get("dpo_loss_weights")
    if weights is not None and len(weights) != len(losses):
        problems.append(f"key 'dpo_loss_weights': {len(weights)} weights for {len(losses)} loss types")
    if "exo_pair" in losses and smoothing == 0.0:
        problems.append("key 'dpo_label_smoothing': the exo_pair loss needs it above 0 (e.g. 1e-3)")
    return problems


VALIDATORS.append(check_dpo_values)
