"""Generation samples: the base and the fine-tuned model side by side, in samples.md.

Users read replies before scores. For each prompt, each model writes one
greedy reply and one sampled reply, with the torch seed set just before each
sampled reply, so a sample is reproducible on its own whatever the prompts
around it. Prompts are rendered with the run's template (the base model gets
the same template and tokenizer, so both see the same tokens) and replies end
at the template's end-of-turn token (component/inference/generation.py).

`samples.md` holds one section per prompt: the prompt, then a table with the
base model's replies beside the fine-tuned model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from loguru import logger

from component.data.template import Message
from component.inference.generation import LoadedModel, generate

SAMPLES_FILE = "samples.md"
TITLE_CHARS = 70  # a prompt's first line, cut to this, titles its section


@dataclass(frozen=True)
class SampleSettings:
    """How every reply is generated: greedily, and sampled at `temperature`/`top_p` after seeding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class ModelSamples:
    """One model's replies, one (greedy, sampled) pair per prompt."""

    model: str
    replies: list[tuple[str, str]]


def reply(loaded: LoadedModel, messages: Sequence[Message], settings: SampleSettings, sampled: bool) -> str:
    if sampled:
        torch.manual_seed(settings.seed)  # also seeds every CUDA device
    temperature = settings.temperature if sampled else 0.0
    return "".join(generate(loaded, messages, settings.max_new_tokens, temperature, settings.top_p)).strip()


def model_samples(loaded: LoadedModel, prompts: Sequence[Sequence[Message]], settings: SampleSettings) -> ModelSamples:
    logger.info(f"{loaded.name}: writing a greedy and a sampled reply to {len(prompts)} prompts")
    return ModelSamples(
        loaded.name, [(reply(loaded, p, settings, False), reply(loaded, p, settings, True)) for p in prompts]
    )


# ---------------------------------------------------------------- samples.md


def table_cell(text: str) -> str:
    """Text inside a Markdown table cell: one line, pipes escaped, blank replies shown as such."""
    if not text:
        return "*(empty reply)*"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _title(messages: Sequence[Message]) -> str:
    first = next((m.content for m in reversed(messages) if m.role == "user"), messages[-1].content)
    line = first.strip().splitlines()[0] if first.strip() else "(empty prompt)"
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def _quoted(messages: Sequence[Message]) -> list[str]:
    lines = []
    for m in messages:
        body = m.content.strip().splitlines() or [""]
        lines.append(f"> **{m.role}:** {body[0]}")
        lines += [f"> {line}" for line in body[1:]]
        lines.append(">")
    return lines[:-1]


def samples_markdown(
    prompts: Sequence[Sequence[Message]],
    tuned: ModelSamples,
    base: Optional[ModelSamples],
    settings: SampleSettings,
    template_name: str,
) -> str:
    head = [
        "# Generation samples",
        "",
        f"- fine-tuned: `{tuned.model}`",
        f"- base: `{base.model}`" if base else "- base: none given",
        f"- template: `{template_name}` (the run's, for both models); at most {settings.max_new_tokens} new tokens",
        f"- greedy, and sampled at temperature {settings.temperature}, top_p {settings.top_p}, "
        f"with the seed set to {settings.seed} before each sampled reply",
        "",
    ]
    body = []
    for i, messages in enumerate(prompts):
        greedy, sampled = tuned.replies[i]
        columns = ["", "base", "fine-tuned"] if base else ["", "fine-tuned"]
        rows = [
            ("greedy", greedy, base.replies[i][0] if base else None),
            ("sampled", sampled, base.replies[i][1] if base else None),
        ]
        body += [f"## {i + 1}. {_title(messages)}", "", *_quoted(messages), ""]
        body += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for label, after, before in rows:
            cells = [label, *([table_cell(before)] if base else []), table_cell(after)]
            body.append("| " + " | ".join(cells) + " |")
        body.append("")
    return "\n".join(head + body)


def write_samples(path: Path, markdown: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown, encoding="utf-8")
    logger.info(f"wrote generation samples to {path}")
    return path
