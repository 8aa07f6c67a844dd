"""A Hugging Face tokenizer as GGUF tokenizer metadata (llama.cpp's `tokenizer.ggml.*` keys).

Two kinds, read from the tokenizer's own `tokenizer.json`, never from the model's name:
- byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2) is `gpt2`: tokens as the vocabulary spells
  them, merges, and `pre`, the name llama.cpp gives the text splitting the merges were learned
  on (PRE_TOKENIZERS below, matched on the tokenizer's pre-tokenizer);
- SentencePiece-style BPE with byte fallback (Llama-2, Mistral, Gemma) is `llama`: tokens,
  scores (llama.cpp merges the best-scored pair, so a token's score is minus the rank of the
  merge that makes it) and merges (transformers' reader uses those).
Token types: added special tokens are CONTROL, other added tokens USER_DEFINED, `<0xNN>`
byte tokens BYTE; embedding rows beyond the tokenizer are `[PAD<id>]`, UNUSED, as llama.cpp's
converter writes them. Whether BOS/EOS are added is read from what the tokenizer does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

import gguf

from component.errors import UserError

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE_IN_MERGE = chr(ord(" ") + 256)  # how gguf-py writes a space inside a merge (SpecialVocab)
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` name -> the pre-tokenizer of tokenizer.json it stands for, as
# (step type, what identifies it) per step: a Split's regex, ByteLevel's use_regex, Digits' flag.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, object], ...]] = {
    "gpt-2": (("ByteLevel", True),),
    "smollm": (("Digits", True), ("ByteLevel", True)),  # digits one by one, then GPT-2's split
    "llama-bpe": (("Split", LLAMA3_SPLIT), ("ByteLevel", False)),
    "qwen2": (("Split", QWEN2_SPLIT), ("ByteLevel", False)),
}


class VocabError(UserError):
    """The tokenizer cannot be written as GGUF metadata."""


@dataclass
class GgufVocab:
    """Everything `tokenizer.ggml.*` holds for one tokenizer."""

    model: str
    """`gpt2` (byte-level BPE) or `llama` (SentencePiece-style BPE)."""
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: Optional[list[float]] = None
    special_ids: dict[str, int] = field(default_factory=dict)
    """bos, eos, unk, pad, eot -> token id."""
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: Optional[bool] = None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def _steps(pre_tokenizer: Optional[dict]) -> tuple[tuple[str, object], ...]:
    if pre_tokenizer is None:
        return ()
    if pre_tokenizer["type"] == "Sequence":
        return tuple(s for p in pre_tokenizer["pretokenizers"] for s in _steps(p))
    kind = pre_tokenizer["type"]
    if kind == "ByteLevel":
        return ((kind, pre_tokenizer.get("use_regex", True)),)
    if kind == "Digits":
        return ((kind, pre_tokenizer.get("individual_digits", False)),)
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return ((kind, pattern.get("Regex", pattern.get("String"))),)
    return ((kind, None),)


def bpe_pre_name(pre_tokenizer: Optional[dict]) -> str:
    """llama.cpp's name for this byte-level pre-tokenizer; an unknown one is refused (llama.cpp would
    split text otherwise than the merges were learned on)."""
    steps = _steps(pre_tokenizer)
    for name, known in PRE_TOKENIZERS.items():
        if steps == known:
            return name
    raise VocabError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre_tokenizer)[:200]}) is not one this export can name for "
        f"llama.cpp (known: {', '.join(PRE_TOKENIZERS)}); not supported yet"
    )


def _spm_space_prefix(spec: dict) -> bool:
    """Whether SentencePiece adds '▁' before the text: Metaspace's prepend scheme or a Prepend normalizer."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    normalizers = spec.get("normalizer") or {}
    steps = normalizers.get("normalizers", [normalizers])
    if any(s.get("type") == "Replace" and s.get("content") == "\u2581" for s in steps):
        return any(s.get("type") == "Prepend" for s in steps)
    raise VocabError(
        "the tokenizer has byte fallback but neither SentencePiece's Metaspace pre-tokenizer nor its space "
        "replacement; not supported yet"
    )


def _merges(spec: dict) -> list[str]:
    merges = spec["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(part.replace(" ", SPACE_IN_MERGE) for part in m) for m in merges]


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS and EOS around a text, by encoding one."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
    bos = tokenizer.bos_token_id is not None and tokenizer.bos_token_id in full[:at]
    eos = tokenizer.eos_token_id is not None and tokenizer.eos_token_id in full[at + len(plain) :]
    return bos, eos


def token_types(tokenizer, tokens: list[Optional[str]], spm: bool) -> list[int]:
    added = tokenizer.added_tokens_decoder
    types = []
    for i, token in enumerate(tokens):
        if token is None:
            kind = gguf.TokenType.UNUSED
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        elif spm and i == tokenizer.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif spm and BYTE_TOKEN.fullmatch(token):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    return types


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores from the merges: minus the rank of the first merge that makes a token, so
    llama.cpp, which joins the best-scored pair, joins in the merges' order; 0 for the rest."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "").replace(SPACE_IN_MERGE, " "), i)
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def tokenizer_size(tokenizer) -> int:
    """One more than the largest token id (a vocabulary may have holes)."""
    return max(tokenizer.get_vocab().values()) + 1


def gguf_vocab(tokenizer, n_vocab: int, stop_token: Optional[str], pre: Optional[str] = None) -> GgufVocab:
    """The GGUF vocabulary of `tokenizer`, padded to the model's `n_vocab` embedding rows.

    `stop_token` (the template's end-of-turn token) becomes EOS and EOT, so generation stops where
    training taught the model to; `pre` overrides the detected pre-tokenizer name (a GGUF base's own).
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise VocabError(f"a {spec['model']['type']} tokenizer model is not supported yet (BPE only)")
    size = tokenizer_size(tokenizer)
    if size > n_vocab:
        raise VocabError(f"the tokenizer has token ids up to {size - 1} but the model only {n_vocab} embedding rows")
    spm = bool(spec["model"].get("byte_fallback"))
    raw = [tokenizer.convert_ids_to_tokens(i) if i < size else None for i in range(n_vocab)]
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(raw)]
    merges = _merges(spec)
    special = {
        kind: getattr(tokenizer, f"{kind}_token_id")
        for kind in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{kind}_token_id", None) is not None
    }
    if stop_token is not None:
        stop_id = tokenizer.convert_tokens_to_ids(stop_token)
        if isinstance(stop_id, int) and stop_id != tokenizer.unk_token_id:
            special["eos"] = special["eot"] = stop_id
    add_bos, add_eos = _adds(tokenizer)
    return GgufVocab(
        model="llama" if spm else "gpt2",
        pre=pre or ("default" if spm else bpe_pre_name(spec.get("pre_tokenizer"))),
        tokens=tokens,
        token_types=token_types(tokenizer, raw, spm),
        merges=merges,
        scores=merge_scores(tokens, merges) if spm else None,
        special_ids=special,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=_spm_space_prefix(spec) if spm else None,
    )
