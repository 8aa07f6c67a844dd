"""The tokenizer's own chat_template as a template, and resolving any template against a tokenizer.

`template_name: "auto"` (or none) uses the tokenizer's chat_template
(`AutoTemplate`): the supervised spans come from rendering conversation
prefixes and checking that each rendering is a prefix of the next.
`resolve_template(name, tokenizer)` gives either kind, checked against the
tokenizer (missing special tokens are refused, not added).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from component.config.checks import choice_problems
from component.data.template import AUTO_TEMPLATE, EMPTY_THINK_MODES, MARK, Message, Rendered, Template, TemplateError
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

    The rule is the official template's own boundaries: for assistant message k, everything after
    the rendering of messages[:k] with the generation prompt (which must be a prefix of the whole
    rendering) through the next end-of-turn token (found once, when the template is resolved) is
    supervised: the reply, a tool call's rendering and, by default, its reasoning text. Tool
    results, system, user and developer text never are. Text after the end-of-turn token (a
    newline) is not supervised. The `{% generation %}` tag is not used: most official templates
    lack it. Templates that drop reasoning from earlier turns (Qwen3) are rendered whole, as they
    render the conversation (`render`), or turn by turn as at inference (`render_turns`).
    """

    chat_template: str
    stop_word: str
    name: str = AUTO_TEMPLATE
    source: str = "the tokenizer's own chat_template"

    def stop_text(self, tokenizer) -> str:
        return self.stop_word

    def render(
        self,
        tokenizer,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tools: Optional[list] = None,
        empty_think: str = "supervised",
    ) -> Rendered:
        msgs = [m.chat_template_dict() for m in messages]
        # A generation prompt with empty_think 'prompt' holds the empty think block, as enable_thinking=False puts it
        # (templates without that switch ignore it).
        no_thinking = {"enable_thinking": False} if add_generation_prompt and empty_think == "prompt" else {}
        full = self._apply(tokenizer, msgs, add_generation_prompt, tools, **no_thinking)
        spans = [self._span(tokenizer, msgs, k, full, tools, empty_think) for k in _assistant_turns(messages)]
        if spans and not add_generation_prompt and messages[-1].role == "assistant" and full[spans[-1][1] :].strip():
            raise self._unmaskable("the rendering goes on after the last reply's end-of-turn token")
        rendered = Rendered(full, spans)
        self._check_nothing_lost(tokenizer, messages, msgs, rendered, tools)
        return rendered

    def render_turns(
        self, tokenizer, messages: Sequence[Message], tools: Optional[list] = None, empty_think: str = "supervised"
    ) -> list[tuple[Rendered, int]]:
        """The conversation as inference sees each reply, as (rendering, how many messages it
        renders): the whole rendering, supervising the turns that it renders as their own
        generation would (messages[:k+1] is a prefix of it) and the turns without reasoning, and
        one rendering of messages[:k+1] for each other turn k (an earlier turn whose reasoning the
        template drops from history), supervising that turn only."""
        whole = self.render(tokenizer, messages, tools=tools, empty_think=empty_think)
        msgs = [m.chat_template_dict() for m in messages]
        kept, apart = [], []
        for k, span in zip(_assistant_turns(messages), whole.spans, strict=True):
            upto = self._apply(tokenizer, msgs[: k + 1], False, tools)
            if whole.text.startswith(upto) or messages[k].reasoning is None:
                kept.append(span)  # rendered as generated, or with nothing of its own dropped
            else:
                alone = self.render(tokenizer, messages[: k + 1], tools=tools, empty_think=empty_think)
                apart.append((Rendered(alone.text, alone.spans[-1:]), k + 1))
        return [(Rendered(whole.text, kept), len(messages)), *apart]

    def _span(self, tokenizer, msgs: list[dict], k: int, full: str, tools, empty_think: str) -> tuple[int, int]:
        # The history as the whole rendering shows it: as given, or (Qwen3, when a later user turn
        # follows) with the reasoning of earlier turns dropped, as the template drops it there.
        for history in _histories(msgs[:k]):
            prompt = self._apply(tokenizer, history, True, tools)
            if full.startswith(prompt):
                break
        else:
            raise self._unmaskable(f"the generation prompt before message {k} is not a prefix of the whole rendering")
        if empty_think == "prompt" and "reasoning_content" not in msgs[k]:
            # The empty think block joins the prompt, as the enable_thinking=False generation prompt puts it.
            quiet = self._apply(tokenizer, history, True, tools, enable_thinking=False)
            if len(quiet) > len(prompt) and full.startswith(quiet):
                prompt = quiet
        # The turn ends at the last end-of-turn token of its own rendering (a reply may quote the
        # token); where the whole rendering shows the turn otherwise (without its reasoning), at the
        # first one after its reply text.
        upto = self._apply(tokenizer, [*history, msgs[k]], False, tools)
        if full.startswith(upto):
            end = upto.rfind(self.stop_word, len(prompt))
        else:
            content = (msgs[k].get("content") or "").strip()
            at = full.find(content, len(prompt)) if content else -1
            end = full.find(self.stop_word, at + len(content) if at >= 0 else len(prompt))
        if end < 0:
            raise self._unmaskable(f"message {k} is not followed by the end-of-turn token {self.stop_word!r}")
        return len(prompt), end + len(self.stop_word)

    def _check_nothing_lost(self, tokenizer, messages: Sequence[Message], msgs: list[dict], rendered: Rendered, tools):
        """A template that ignores a field drops data silently. Each one is tested by difference:
        every tool definition and tool result, put in as a marker, shows up;
        each call's name and argument names and each reply are inside its own turn; reasoning
        changes the rendering of its own turn (as generated: history may drop it, as Qwen3's does)."""
        text = rendered.text
        if tools:  # each definition, renamed to a marker, shows up (calls keep their names)
            marked_tools = [
                {**t, "function": {**t["function"], "name": f"{MARK}tool {i}{MARK}"}} for i, t in enumerate(tools)
            ]
            shown = self._apply(tokenizer, msgs, False, marked_tools)
            for i, tool in enumerate(tools):
                if f"{MARK}tool {i}{MARK}" not in shown:
                    raise self._cannot("tool definitions", f"the tool {_tool_name(tool)!r} does not appear")
        results = [k for k, m in enumerate(messages) if m.role == "tool"]
        if results:
            marked = [{**d, "content": f"{MARK}result {k}{MARK}"} if k in results else d for k, d in enumerate(msgs)]
            shown = self._apply(tokenizer, marked, False, tools)
            for k in results:
                if f"{MARK}result {k}{MARK}" not in shown:
                    raise self._cannot("tool results", f"the result in message {k} does not appear")
        turns = iter(rendered.spans)
        for k, m in enumerate(messages):
            if m.role != "assistant":
                continue
            start, end = next(turns)
            turn = text[start:end]
            if m.content.strip() and not _appears(m.content, turn):
                raise self._cannot("this assistant turn", f"the reply text of message {k} does not appear in it")
            for call in m.tool_calls:
                if call.name not in turn or any(key not in turn for key in call.arguments):
                    raise self._cannot("tool calls", f"the call to {call.name!r} in message {k} does not appear")
            if m.reasoning is not None:
                without = {key: v for key, v in msgs[k].items() if key != "reasoning_content"}
                if self._apply(tokenizer, [*msgs[:k], msgs[k]], False, tools) == self._apply(
                    tokenizer, [*msgs[:k], without], False, tools
                ):
                    raise self._cannot("reasoning text", f"the reasoning of message {k} changes nothing")

    def _apply(self, tokenizer, msgs: list[dict], add_generation_prompt: bool, tools=None, **kwargs) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs,
                tools=tools or None,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except Exception as exc:  # jinja raise_exception and template errors all land here
            raise TemplateError(f"the tokenizer's chat_template rejected the conversation: {exc}") from exc

    def _cannot(self, what: str, why: str) -> TemplateError:
        return TemplateError(
            f"template_name 'auto': the chat_template does not render {what} ({why}), so it would be lost; "
            "use a model whose chat_template renders it, give one as chat_template (a Jinja file), or remove it"
        )

    def _unmaskable(self, why: str) -> TemplateError:
        return TemplateError(
            f"template_name 'auto': the tokenizer's chat_template cannot be masked by prefixes ({why}); "
            f"set template_name to a named template ({', '.join(sorted(TEMPLATES))})"
        )


def _histories(msgs: list[dict]) -> list[list[dict]]:
    """The history before a turn as given, and without the reasoning of its assistant turns."""
    stripped = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in msgs]
    return [msgs, stripped] if stripped != msgs else [msgs]


def _assistant_turns(messages: Sequence[Message]) -> list[int]:
    return [k for k, m in enumerate(messages) if m.role == "assistant"]


def _tool_name(tool: Any) -> Optional[str]:
    if isinstance(tool, dict):
        function = tool.get("function", tool)
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    return None


def _appears(content: str, text: str) -> bool:
    """The text is in the rendering, as written, trimmed, or as a JSON string (Llama-3.1's `tojson`)."""
    stripped = content.strip()
    return stripped in text or json.dumps(content, ensure_ascii=False) in text


def use_chat_template_file(tokenizer, path: Optional[str]) -> None:
    """The config's `chat_template` file replaces the tokenizer's own (it is saved with the
    tokenizer, so inference renders as training did)."""
    if path:
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")


def auto_template(tokenizer, where: str = "the tokenizer") -> AutoTemplate:
    """Wrap the tokenizer's chat_template, finding its end-of-turn token on a probe conversation."""
    chat_template = getattr(tokenizer, "chat_template", None)
    if not isinstance(chat_template, str) or not chat_template:
        raise TemplateError(
            f"template_name 'auto': {where} has no chat_template; set template_name to one of "
            f"{', '.join(sorted(TEMPLATES))}"
        )
    probe = AutoTemplate(chat_template, stop_word="")
    msgs = [m.chat_template_dict() for m in PROBE[:2]]
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


def check_template_keys(values: dict[str, Any]) -> list[str]:
    """Config check of the keys that decide how conversations render (SFT and DPO): chat_template
    (a file, used by template_name 'auto') and empty_think_block."""
    problems = choice_problems("empty_think_block", values.get("empty_think_block", "supervised"), EMPTY_THINK_MODES)
    chat_template = values.get("chat_template")
    if chat_template is not None:
        if not isinstance(chat_template, str) or not Path(chat_template).is_file():
            problems.append(f"key 'chat_template': {chat_template!r} is not a file; give a Jinja chat template file")
        if values.get("template_name") not in (None, AUTO_TEMPLATE):
            problems.append(
                f"keys 'chat_template' and 'template_name' ({values['template_name']!r}) are both set: a chat "
                "template file is used by template_name 'auto'; drop one"
            )
    return problems
