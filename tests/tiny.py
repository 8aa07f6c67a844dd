"""Tiny models and a tiny tokenizer, built in-process so tests are hermetic.

`tiny_tokenizer()` trains a byte-level BPE on a few sentences and adds the
special tokens our templates use. `save_tiny_model(kind, path)` writes a
2-layer random model of the given architecture plus that tokenizer, ready
for `from_pretrained(path)`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GemmaConfig,
    LlamaConfig,
    MambaConfig,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<|endoftext|>",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "User: hello there\nAssistant: hi, how can I help you today?",
    "system user assistant model [INST] [/INST] <<SYS>> <</SYS>> USER: ASSISTANT:",
    "Write a short poem about the sea. The sea is wide and blue and deep.",
    "What is two plus two? Two plus two is four.",
    "Caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \u3053\u3093\u306b\u3061\u306f \U0001f600",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]
VOCAB_SIZE = 512


@functools.cache
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(bos: str = "<s>", eos: str = "</s>", pad: str | None = "<pad>") -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token=pad,
    )
    return tok


def tiny_config(kind: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2)
    if kind == "llama":
        return LlamaConfig(
            **common,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
    if kind == "gemma":
        return GemmaConfig(
            **common,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
        )
    if kind == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=2, n_head=4)
    if kind == "mamba":
        return MambaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            state_size=8,
            expand=2,
            conv_kernel=4,
            use_cache=False,
        )
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, tokenizer=None):
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(kind, len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(kind: str, path: Path, seed: int = 0, **tok_kwargs) -> Path:
    tokenizer = tiny_tokenizer(**tok_kwargs)
    model = tiny_model(kind, seed, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
