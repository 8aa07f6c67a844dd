"""The tokenizer's own chat_template as a template, and resolving any template against a tokenizer.

`template_name: "auto"` (or none) uses the tokenizer's chat_template
(`AutoTemplate`): the supervised spans come from rendering conversation
prefixes and checking that each rendering is a prefix of the next.
`resolve_template(name, tokenizer)` gives either kind, checked against the
tokenizer (missing special tokens are refused, not added).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from component.data.template import AUTO_TEMPLATE, Message, Rendered, Template, TemplateError
from component.data.template_registry import TEMPLATES, get_template, suggest_template
from component.errors import ConfigError

PROBE = [
    Message("user", "Hi there"),
    Message("assistant", "Hello, friend"),
    Message("user", "Bye"),
    Message("assistant", "See you"),
]


@dataclass(frozen=True)
class AutoTemplate:
    """The tokenizer's own chat_template, with supervised spans found from conversation prefixes.

    For each assistant message k: the rendering of messages[:k] with a generation prompt must be
    a prefix of the rendering of messages[:k+1], which must be a prefix of the whole rendering.
    The reply's span runs from the end of the former through the end-of-turn token (found once,
    when the template is resolved); text after that token (a newline) is not supervised. The
    `{% generation %}` tag is not used: most official templates lack it.
    """

    chat_template: str
    stop_word: str
    name: str = AUTO_TEMPLATE
    source: str = "the tokenizer's own chat_template"

    def stop_text(self, tokenizer) -> str:
        return self.stop_word

    def render(self, tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> Rendered:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        full = self._apply(tokenizer, msgs, add_generation_prompt)
        spans = []
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._apply(tokenizer, msgs[:k], True)
            upto = self._apply(tokenizer, msgs[: k + 1], False)
            if not upto.startswith(prompt) or not full.startswith(upto):
                raise self._unmaskable(f"the rendering up to message {k} is not a prefix of the longer rendering")
            end = upto.rfind(self.stop_word, len(prompt))
            if end < 0:
                raise self._unmaskable(f"reply {k} is not followed by the end-of-turn token {self.stop_word!r}")
            spans.append((len(prompt), end + len(self.stop_word)))
        return Rendered(full, spans)

    def _apply(self, tokenizer, msgs: list[dict], add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raise_exception and template errors all land here
            raise TemplateError(f"the tokenizer's chat_template rejected the conversation: {exc}") from exc

    def _unmaskable(self, why: str) -> TemplateError:
        return TemplateError(
            f"template_name 'auto': the tokenizer's chat_template cannot be masked by prefixes ({why}); "
            f"set template_name to a named template ({', '.join(sorted(TEMPLATES))})"
        )


def auto_template(tokenizer, where: str = "the tokenizer") -> AutoTemplate:
    """Wrap the tokenizer's chat_template, finding its end-of-turn token on a probe conversation."""
    chat_template = getattr(tokenizer, "chat_template", None)
    if not isinstance(chat_template, str) or not chat_template:
        raise TemplateError(
            f"template_name 'auto': {where} has no chat_template; set template_name to one of "
            f"{', '.join(sorted(TEMPLATES))}"
        )
    probe = AutoTemplate(chat_template, stop_word="")
    msgs = [{"role": m.role, "content": m.content} for m in PROBE[:2]]
    prompt = probe._apply(tokenizer, msgs[:1], True)
    upto = probe._apply(tokenizer, msgs, False)
    if not upto.startswith(prompt):
        raise probe._unmaskable("the generation prompt is not a prefix of the rendered reply")
    region = upto[len(prompt) :]
    at = region.find(PROBE[1].content)
    if at < 0:
        raise probe._unmaskable("the reply text does not appear after the generation prompt")
    stop = _first_special_token(tokenizer, region[at + len(PROBE[1].content) :])
    if stop is None:
        raise probe._unmaskable("no special end-of-turn token follows the reply")
    template = AutoTemplate(chat_template, stop_word=stop)
    template.render(tokenizer, PROBE)  # fails now, naming the template, if prefixes do not chain
    return template


def _first_special_token(tokenizer, text: str) -> Optional[str]:
    specials = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special
    }
    best = None
    for tok in specials:
        pos = text.find(tok)
        if tok and pos >= 0 and not text[:pos].strip() and (best is None or pos < best[0]):
            best = (pos, tok)
    return best[1] if best else None


# ---------------------------------------------------------------- resolving against a tokenizer


def resolve_template(name: Optional[str], tokenizer, where: str = "the tokenizer"):
    """The template to train with, checked against the tokenizer.

    None or 'auto' uses the tokenizer's chat_template (a config error when it has none). A named
    template whose markup tokens are missing from the tokenizer is refused, not patched: added
    tokens would start as untrained embeddings, and under LoRA they would not be trained or saved
    unless the embeddings were too.
    """
    try:
        if name is None or name == AUTO_TEMPLATE:
            return auto_template(tokenizer, where)
        template = get_template(name)
    except TemplateError as exc:
        key = "template_name" if name is not None else "template_name (missing)"
        raise ConfigError(f"key '{key}': {exc}") from None
    problems = template_token_problems(template, tokenizer)
    if problems:
        raise ConfigError(
            f"key 'template_name': template {name!r} does not fit {where}:\n  - "
            + "\n  - ".join(problems)
            + "\nUse the template the model was trained with ('auto' uses the tokenizer's own chat_template)."
        )
    return template


def template_token_problems(template: Template, tokenizer) -> list[str]:
    """What the tokenizer lacks for this template: BOS/EOS it uses, and markup that is not one token."""
    formats = " ".join(
        [
            template.prefix,
            template.user_format,
            template.assistant_format,
            template.system_format or "",
            template.separator,
            template.stop_word,
        ]
    )
    problems = []
    for key, attr in (("{bos}", "bos_token"), ("{eos}", "eos_token")):
        if key in formats and not getattr(tokenizer, attr, None):
            problems.append(f"the template uses the tokenizer's {attr}, and the tokenizer has none")
    needed = list(template.special_tokens)
    if template.stop_word != "{eos}" and template.stop_word not in needed:
        needed.append(template.stop_word)
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = []
    for tok in needed:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == unk:
            missing.append(tok)
    if missing:
        problems.append(
            f"these tokens are not single tokens in the tokenizer: {', '.join(missing)} (the text would be "
            "split into plain pieces, and the model could never emit one end-of-turn token)"
        )
    return problems


def pad_eos_note(template, tokenizer, labels: Sequence[int]) -> Optional[tuple[str, str]]:
    """(level, message) when pad == eos and the template stops on eos; a warning only if the
    supervised labels of a sample example lack that eos."""
    eos = tokenizer.eos_token_id
    if eos is None or tokenizer.pad_token_id != eos or template.stop_text(tokenizer) != tokenizer.eos_token:
        return None
    if eos in labels:
        return (
            "info",
            f"pad_token is the EOS token {tokenizer.eos_token!r}, which template {template.name!r} "
            "ends replies with; labels keep each reply's EOS by position (padding is masked by position, "
            "not by id), so the model still learns to stop",
        )
    return (
        "warning",
        f"pad_token is the EOS token {tokenizer.eos_token!r}, which template {template.name!r} "
        "ends replies with, and the labels of the first example do not keep it: the model will not learn "
        "to stop",
    )


def check_template_name(values: dict[str, Any]) -> list[str]:
    """Config check: template_name is a known template or 'auto', and present where the task needs one."""
    name = values.get("template_name")
    task = values.get("task_type", "sft")
    if name is None:
        if task in ("pretrain", "sft"):  # sft: the tokenizer's chat_template, checked when it is loaded
            return []
        return [
            f"key 'template_name' is required for task_type '{task}': one of {', '.join(sorted(TEMPLATES))}, or 'auto'"
        ]
    if name != AUTO_TEMPLATE and name not in TEMPLATES:
        hint = suggest_template(name)
        return [f"key 'template_name': unknown template {name!r}{f' (did you mean {hint!r}?)' if hint else ''}"]
    return []
