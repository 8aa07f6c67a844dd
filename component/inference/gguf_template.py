"""A named template (component/data/template_registry.py) as a Jinja chat template and an Ollama Modelfile.

llama.cpp reads `tokenizer.chat_template` (Jinja) from a GGUF file; Ollama reads the
Go template of a Modelfile. Both are written from the same `Template` fields that
`render` reads, so a conversation is formatted at inference as it was in training:
`jinja_template` renders exactly as `render` does (the export checks it on probe
conversations before writing anything; tests/test_gguf_export.py on every template).

`{bos}` and `{eos}` become the tokenizer's own token text at export, as `render` fills
them; the file never depends on which token a runtime calls BOS.

The Go template cannot strip whitespace (Go's template language has no such function),
so a template with `strip_content` sends the message as written; nor count rounds,
so a template with `{idx}` (ChatGLM2) gets no TEMPLATE line. Ollama adds BOS itself
where the GGUF says `add_bos_token`, so the first `{bos}` is then left out.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from component.data.template import Template
from component.errors import UserError


class ModelfileError(UserError):
    """The template cannot be written into an Ollama Modelfile."""


PLACEHOLDER = re.compile(r"\{(content|system|bos|eos|idx)\}")
GO_UNSUPPORTED = ("{idx}",)


def _jinja_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def _jinja_expr(fmt: str, tokens: dict[str, str], content: str = "content", system: str = "system") -> str:
    """A format string as one Jinja expression joined with `~`; placeholders become variables."""
    names = {"content": content, "system": system, "idx": "((loop.index0 // 2 + 1) | string)"}
    parts = []
    for i, piece in enumerate(PLACEHOLDER.split(fmt)):
        if i % 2 == 0:
            if piece:
                parts.append(_jinja_literal(piece))
        elif piece in tokens:
            if tokens[piece]:
                parts.append(_jinja_literal(tokens[piece]))
        else:
            parts.append(names[piece])
    return " ~ ".join(parts) or '""'


def _special_texts(tokenizer) -> dict[str, str]:
    return {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}


def jinja_template(template: Template, tokenizer) -> str:
    """A Jinja chat template that renders `messages` as `render(template, tokenizer, messages)` does,
    with `add_generation_prompt` as there; the conversation errors of `render` are `raise_exception`."""
    tokens = _special_texts(tokenizer)

    def expr(fmt: str, content: str = "content", system: str = "system") -> str:
        return _jinja_expr(fmt, tokens, content, system)

    def clean(value: str) -> str:
        return f"({value} | trim)" if template.strip_content else value

    default = _jinja_literal(template.default_system) if template.default_system is not None else "none"
    out = [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
        f"{{%- else -%}}{{%- set system = {default} -%}}{{%- set turns = messages -%}}{{%- endif -%}}",
    ]
    if template.system_mode == "refuse":
        why = f"template {template.name!r} has no system role ({template.system_note}); remove the system prompt"
        out.append(
            f"{{%- if messages and messages[0]['role'] == 'system' -%}}"
            f"{{{{ raise_exception({_jinja_literal(why)}) }}}}{{%- endif -%}}"
        )
    if template.prefix:
        out.append(f"{{{{- {expr(template.prefix)} -}}}}")
    if template.system_mode == "native" and template.system_format:
        out.append(f"{{%- if system is not none -%}}{{{{- {expr(template.system_format, clean('system'))} -}}}}")
        out.append("{%- endif -%}")
    out += [
        "{%- for message in turns -%}",
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}",
        "{{ raise_exception('messages must alternate user/assistant, starting with the user') }}{%- endif -%}",
        "{%- if message['role'] == 'user' -%}",
    ]
    user = clean("message['content']")
    if template.system_mode == "fold":
        inner = "message['content']" if template.strip_after_fold else user
        folded = expr(template.fold_format, inner)
        folded = f"(({folded}) | trim)" if template.strip_after_fold else f"({folded})"
        out.append(f"{{%- if loop.first and system is not none -%}}{{%- set content = {folded} -%}}")
        out.append(f"{{%- else -%}}{{%- set content = {user} -%}}{{%- endif -%}}")
    else:
        out.append(f"{{%- set content = {user} -%}}")
    out += [f"{{{{- {expr(template.user_format)} -}}}}", "{%- else -%}"]
    if template.final_assistant_prefix:
        out.append(
            "{%- if '</think>' in message['content'] -%}{{ raise_exception("
            + _jinja_literal(f"template {template.name!r}: a reply containing '</think>' is rewritten")
            + ") }}{%- endif -%}"
        )
        out.append(
            f"{{%- if loop.last -%}}{{{{- {_jinja_literal(template.final_assistant_prefix)} -}}}}{{%- endif -%}}"
        )
    reply = expr(template.assistant_format, clean("message['content']"))
    if template.separator:
        reply += " ~ " + expr(template.separator)
    out += [f"{{{{- {reply} -}}}}", "{%- endif -%}", "{%- endfor -%}", "{%- if add_generation_prompt -%}"]
    out.append(
        "{%- if turns and turns[-1]['role'] == 'assistant' -%}{{ raise_exception("
        "'add_generation_prompt needs the conversation to end with a user message') }}{%- endif -%}"
    )
    if template.final_assistant_prefix:
        out.append(f"{{{{- {_jinja_literal(template.final_assistant_prefix)} -}}}}")
    out.append("{%- endif -%}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- Ollama


def _go_literal(text: str) -> str:
    return "{{- " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _go_text(fmt: str, tokens: dict[str, str], content: str = ".Content", system: str = "$.System") -> str:
    """A format as Go template text. Every piece is an action that trims the template source before it
    (`{{-`), and literals are quoted strings, so the layout of the template adds no text of its own;
    `{bos}` goes through `$bos` (empty the first time where the runtime adds BOS itself)."""
    out = []
    for i, piece in enumerate(PLACEHOLDER.split(fmt)):
        if i % 2 == 0:
            out.append(_go_literal(piece))
        elif piece == "bos":
            out.append(f"{{{{- $bos }}}}{{{{- $bos = {json.dumps(tokens['bos'], ensure_ascii=False)} }}}}")
        elif piece == "eos":
            out.append(_go_literal(tokens["eos"]))
        else:
            out.append("{{- " + {"content": content, "system": system}[piece] + " }}")
    return "".join(out)


def go_template(template: Template, tokenizer, add_bos: bool) -> Optional[str]:
    """Ollama's TEMPLATE for this template, or None where Go's template language cannot express it.

    The system prompt is read from `.System` (the request's system messages, else the Modelfile's
    SYSTEM), never from `.Messages`: Ollama versions differ on whether system messages stay there."""
    formats = (template.prefix, template.user_format, template.assistant_format, template.system_format or "")
    if any(marker in fmt for fmt in formats for marker in GO_UNSUPPORTED):
        return None
    tokens = _special_texts(tokenizer)
    fold = template.system_mode == "fold"
    thinks = bool(template.final_assistant_prefix)
    out = []
    if any("{bos}" in fmt for fmt in (*formats, template.fold_format)):
        first_bos = "" if add_bos else tokens["bos"]
        out.append(f"{{{{- $bos := {json.dumps(first_bos, ensure_ascii=False)} }}}}")
    if template.prefix:
        out.append(_go_text(template.prefix, tokens))
    if template.system_mode == "native" and template.system_format:
        out.append(
            f"{{{{- if $.System }}}}{_go_text(template.system_format, tokens, content='$.System')}{{{{- end }}}}"
        )
    if fold:
        out.append("{{- $folding := true }}")
    out += ["{{- range $i, $_ := .Messages }}"]
    if thinks:
        out.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    out.append('{{- if eq .Role "user" }}')
    user = _go_text(template.user_format, tokens)
    if fold:
        folded = _go_text(template.user_format.replace("{content}", template.fold_format), tokens, system="$.System")
        out.append(f"{{{{- if and $.System $folding }}}}{folded}{{{{- else }}}}{user}{{{{- end }}}}")
        out.append("{{- $folding = false }}")
    else:
        out.append(user)
    if thinks:  # Qwen3: the empty think block opens the reply being generated
        out.append(f"{{{{- if $last }}}}{_go_literal(template.final_assistant_prefix)}{{{{- end }}}}")
    out.append('{{- else if eq .Role "assistant" }}')
    if thinks:
        out.append(f"{{{{- if $last }}}}{_go_literal(template.final_assistant_prefix)}{{{{- end }}}}")
    out.append(_go_text(template.assistant_format + template.separator, tokens))
    out += ["{{- end }}", "{{- end }}"]
    return "\n".join(out)


def modelfile(
    gguf_name: str,
    template: Optional[Template],
    tokenizer,
    stop_words: list[str],
    add_bos: bool,
    source: str,
) -> str:
    """The Ollama Modelfile beside the GGUF file: FROM, TEMPLATE, SYSTEM, PARAMETER stop."""
    lines = [f"# Ollama Modelfile for {gguf_name}, written by script/export_gguf.py ({source}).", ""]
    lines.append(f'FROM "./{gguf_name}"' if any(c.isspace() for c in gguf_name) else f"FROM ./{gguf_name}")
    go = go_template(template, tokenizer, add_bos) if template is not None else None
    if go is not None:
        lines.append(f'TEMPLATE """{go}"""')
    else:
        lines += [
            "# No TEMPLATE: this chat format cannot be written in Ollama's template language here;",
            "# Ollama then picks one from the GGUF's tokenizer.chat_template.",
        ]
    if template is not None and template.default_system is not None:
        if '"""' in template.default_system:
            raise ModelfileError(
                f'template {template.name!r}: a default system prompt containing """ cannot be written'
            )
        lines.append(f'SYSTEM """{template.default_system}"""')
    for stop in stop_words:  # Ollama's parser takes a quoted value as it is, without escapes
        if '"' in stop or "\n" in stop:
            raise ModelfileError(f"stop token {stop!r} cannot be written as a Modelfile PARAMETER")
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
