"""Rewrite golden_templates.json: every template's text, ids and labels on one conversation (a dev tool).

The tokenizer is tests/tiny.py's in-process BPE (EOS '</s>', or '<|endoftext|>' for mamba), with the
template's markup tokens added as special tokens. Review the diff of the JSON before committing it:
the strings are the templates' formats, which came from the sources named in component/data/template_registry.py.
Usage: python tests/assets/build_golden.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from component.data.template_registry import TEMPLATES  # noqa: E402
from component.data.template import conversation_messages, encode, render  # noqa: E402
from tests.tiny import tiny_tokenizer  # noqa: E402

GOLDEN = Path(__file__).parent / "golden_templates.json"
CONVERSATION = [{"human": "What is two plus two?", "assistant": "Four."}, {"human": "And {content}?", "assistant": "Braces stay."}]
SYSTEM = "Be brief."


def golden_tokenizer(template):
    tok = tiny_tokenizer(eos="<|endoftext|>" if template.name == "mamba" else "</s>")
    missing = [t for t in template.special_tokens if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


def golden(template) -> dict:
    tok = golden_tokenizer(template)
    system = None if template.system_mode == "refuse" else SYSTEM
    rendered = render(template, tok, conversation_messages(CONVERSATION, system))
    encoded = encode(tok, rendered)
    return {"text": rendered.text, "supervised": [rendered.text[a:b] for a, b in rendered.spans],
            "input_ids": encoded.input_ids, "labels": encoded.labels}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps({n: golden(t) for n, t in sorted(TEMPLATES.items())}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(TEMPLATES)} templates)")
