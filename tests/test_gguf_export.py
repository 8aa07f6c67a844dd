"""script/export_gguf.py: GGUF files that transformers' own GGUF reader loads back as the model we trained.

Each exported file is read by an independent reader, transformers' `from_pretrained(dir, gguf_file=...)`:
the same logits (f32 within 1e-5, f16/bf16 within 1e-2 relative, the block formats measured and
bounded), the same token ids on a multilingual sample, and the chat template in the file renders
five conversations exactly as our `render` does. The demo loop (SmolLM2 GGUF -> LoRA -> GGUF -> the
same greedy reply, and train.py fine-tuning from the exported file) is marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from component.data.template import Message, render
from component.data.template_registry import TEMPLATES, get_template
from component.inference.gguf_template import go_template, jinja_template
from component.runner import run
from component.training.outputs import META_FILE
from script import export_gguf
from tests.conftest import ROOT, base_config, write_config
from tests.runs import load_config
from tests.tiny import tiny_tokenizer

ASSETS = ROOT / "tests" / "assets" / "tokenizers"
GGUF_DUMP = Path(sys.executable).parent / "gguf-dump"
# Relative logit error ||exported - source|| / ||source||. The block formats are bounded loosely: on random
# tiny models (no structure for 4 bits to keep) q4 measures 0.08-0.26, while a tensor in the wrong layout
# gives an error near 1 or above; test_logits_round_trip_in_every_dtype prints each measurement.
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "bf16": 1e-2, "q8_0": 3e-2, "q4_0": 0.5, "q4_1": 0.5}
SAMPLE = [
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve über 你好 こんにちは 😀 Привет, мир! مرحبا",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "  two leading spaces,\ttabs\n\nand <|im_start|> or <s> in text",
]
CONVERSATIONS = [
    [Message("user", "Hi"), Message("assistant", "Hello!")],
    [Message("system", "Be brief."), Message("user", "What is two plus two?"), Message("assistant", "Four.")],
    [Message("user", "  padded question  "), Message("assistant", " padded answer "), Message("user", "Next?")],
    [Message("user", 'Café 你好 😀 {content} "quotes" \\n'), Message("assistant", "ok"), Message("user", "again")],
    [Message("system", "Line one\nline two"), Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2")],
]
COMMON = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, max_position_embeddings=512)


def _config(kind: str, vocab: int):
    """Tiny configs transformers' GGUF reader rebuilds exactly: the values it does not read (Qwen3's and
    Gemma's head size, Gemma's query scale) are left at the defaults it falls back to."""
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2, **COMMON)
    if kind == "mistral":  # llama.cpp runs it as `llama`; transformers' reader loads it back as Llama
        return MistralConfig(
            vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **COMMON
        )
    if kind == "qwen2":
        return Qwen2Config(vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2, **COMMON)
    if kind == "qwen3":
        return Qwen3Config(vocab_size=vocab, num_attention_heads=2, num_key_value_heads=1, head_dim=128, **COMMON)
    if kind == "gemma2":
        return Gemma2Config(vocab_size=vocab, num_attention_heads=2, num_key_value_heads=1, head_dim=256, **COMMON)
    if kind == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab, num_attention_heads=2, num_key_value_heads=1, head_dim=256, **COMMON)
    raise ValueError(kind)


# kind -> (tokenizer's BOS/EOS, the family's template in our registry)
KINDS = {
    "llama": (("<s>", "</s>"), "llama3"),
    "mistral": (("<s>", "</s>"), "mistral"),
    "qwen2": (("<s>", "</s>"), "qwen2"),
    "qwen3": (("<s>", "</s>"), "chatml"),  # the tiny tokenizer has no <think>: qwen3's own is tested on Qwen3's
    "gemma2": (("<bos>", "<eos>"), "gemma"),
    "gemma3": (("<bos>", "<eos>"), "gemma"),
}
DTYPES = list(TOLERANCE)
DiskUsage = namedtuple("DiskUsage", "total used free")  # shutil.disk_usage's result
GO = shutil.which("go")
# Renders Ollama's TEMPLATE with Go's text/template, the package Ollama renders it with, given .System (the
# system messages joined) and .Messages (all messages, as Ollama's `collate` leaves them).
GO_RENDERER = """package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Template string
	System   string
	Messages []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out := []string{}
	for _, c := range cases {
		t, err := template.New("").Parse(c.Template)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"System": c.System, "Messages": c.Messages}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def save_model(path: Path, kind: str, tokenizer, template: str | None = None, rows: int = 0) -> Path:
    """A random tiny model of `kind` with `tokenizer` (and at least `rows` embedding rows); norms moved
    off 1 and biases off 0 so that a lost Gemma offset or bias shows in the logits."""
    torch.manual_seed(0)
    config = _config(kind, max(rows, max(tokenizer.get_vocab().values()) + 1))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if template:
        (path / META_FILE).write_text(json.dumps({"template_name": template, "finished": True}))
    return path


def compact(tokenizer, folder: Path):
    """The tokenizer with its ids renumbered 0..n-1 in the same order: the trimmed official tokenizers
    keep the real ids (Gemma-3's reach 262k), and a vocabulary that large takes transformers' GGUF reader
    20 s to rebuild. Tokens, merges and the pipeline are unchanged, so the text splits the same."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    ids = sorted(set(spec["model"]["vocab"].values()) | {a["id"] for a in spec["added_tokens"]})
    new = {old: i for i, old in enumerate(ids)}
    spec["model"]["vocab"] = {token: new[i] for token, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = new[added["id"]]
    processors = (spec.get("post_processor") or {}).get("processors", [spec.get("post_processor") or {}])
    for processor in processors:
        for special in processor.get("special_tokens", {}).values():
            special["ids"] = [new[i] for i in special["ids"]]
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(folder)


def export(*args) -> int:
    return export_gguf.main([str(a) for a in args])


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).norm() / reference.norm())


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


def load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """Each kind saved with the tiny tokenizer and its family's template, exported in every dtype."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind, ((bos, eos), template) in KINDS.items():
        source = save_model(root / f"tiny-{kind}", kind, tiny_tokenizer(bos=bos, eos=eos), template)
        files = {}
        for dtype in DTYPES:
            files[dtype] = root / f"{kind}-{dtype}.gguf"
            assert export("--model", source, "--output", files[dtype], "--dtype", dtype) == 0
        out[kind] = (source, files)
    return out


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_round_trip_in_every_dtype(exported, kind, capsys):
    source, files = exported[kind]
    reference_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = torch.randint(0, reference_model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = logits(reference_model, ids)
    errors = {dtype: relative_error(logits(load_gguf(files[dtype]), ids), reference) for dtype in DTYPES}
    with capsys.disabled():
        sizes = {dtype: files[dtype].stat().st_size for dtype in DTYPES}
        print(f"\n{kind}: relative logit error {errors}; bytes {sizes}")
    for dtype, error in errors.items():
        assert error < TOLERANCE[dtype], (kind, dtype, error)
    assert errors["f16"] > 0 and errors["q8_0"] > errors["f16"]  # the dtypes really differ: the check can fail


@pytest.mark.parametrize("kind", list(KINDS))
def test_tokenizer_ids_and_chat_template_round_trip(exported, kind):
    source, files = exported[kind]
    ours = AutoTokenizer.from_pretrained(source)
    back = AutoTokenizer.from_pretrained(files["q8_0"].parent, gguf_file=files["q8_0"].name)
    for text in SAMPLE:
        assert back(text).input_ids == ours(text).input_ids, text
    template = get_template(KINDS[kind][1])
    for messages in CONVERSATIONS:
        dicts = [m.chat_template_dict() for m in messages]
        for generation in (False, True) if messages[-1].role == "user" else (False,):
            expected = render(template, ours, messages, add_generation_prompt=generation).text
            assert back.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation) == expected


@pytest.mark.parametrize(
    "name, kind, template",
    [
        ("smollm2", "llama", "smollm"),
        ("llama3_1", "llama", "llama3"),
        ("qwen3", "qwen3", "qwen3"),
        ("mistral", "llama", "mistral"),
        ("gemma3", "gemma3", "gemma"),
    ],
)
def test_official_tokenizers_round_trip(tmp_path, official, name, kind, template):
    """Byte-level BPE (SmolLM2, Llama-3.1, Qwen3) and SentencePiece with byte fallback (Mistral,
    Gemma-3): the same ids, BOS added or not as the tokenizer does, and the family's template."""
    tokenizer = compact(official(name), tmp_path / "tokenizer")
    source = save_model(tmp_path / "model", kind, tokenizer, template)
    path = tmp_path / f"{name}.gguf"
    assert export("--model", source, "--output", path, "--dtype", "q8_0") == 0
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(source)
    for text in SAMPLE:
        assert back(text).input_ids == ours(text).input_ids, text
    for messages in CONVERSATIONS:
        dicts = [m.chat_template_dict() for m in messages]
        expected = render(get_template(template), ours, messages).text
        assert back.apply_chat_template(dicts, tokenize=False) == expected
    fields = gguf.GGUFReader(str(path)).fields
    stop = get_template(template).stop_text(ours)
    assert fields["tokenizer.ggml.eos_token_id"].contents() == ours.convert_tokens_to_ids(stop)
    assert fields["tokenizer.ggml.eot_token_id"].contents() == ours.convert_tokens_to_ids(stop)


def test_auto_template_is_the_tokenizers_own_and_the_modelfile_finds_its_twin(tmp_path, official):
    """template_name 'auto': the file carries the tokenizer's chat_template unchanged; SmolLM2's
    renders like our 'smollm', so the Modelfile gets that one's TEMPLATE and default SYSTEM."""
    tokenizer = official("smollm2")
    source = save_model(tmp_path / "model", "llama", tokenizer, "auto")
    path = tmp_path / "smol.gguf"
    assert export("--model", source, "--output", path) == 0
    assert gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    text = path.with_suffix(".Modelfile").read_text()
    assert f'SYSTEM """{TEMPLATES["smollm"].default_system}"""' in text
    assert 'TEMPLATE """' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_model_not_trained_here_keeps_its_own_chat_template(tmp_path, official):
    """A model folder with no run metadata: its tokenizer's chat_template is written as it is, even one
    training would refuse to mask (Qwen3's drops earlier reasoning), and EOS stays the tokenizer's."""
    tokenizer = compact(official("qwen3"), tmp_path / "tokenizer")
    source = save_model(tmp_path / "model", "qwen3", tokenizer)
    path = tmp_path / "qwen3.gguf"
    assert export("--model", source, "--output", path, "--dtype", "f16") == 0
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_jinja_renders_every_named_template_as_render_does(name):
    """Every registered template, as the Jinja written into tokenizer.chat_template: the same text as
    `render` for each conversation with and without the generation prompt, and the same refusals."""
    tokenizer = tiny_tokenizer()
    template = TEMPLATES[name]
    jinja = jinja_template(template, tokenizer)
    for messages in CONVERSATIONS:
        for generation in (False, True):
            try:
                expected = render(template, tokenizer, messages, add_generation_prompt=generation).text
            except ValueError:
                expected = None
            try:
                got = tokenizer.apply_chat_template(
                    [m.chat_template_dict() for m in messages],
                    chat_template=jinja,
                    tokenize=False,
                    add_generation_prompt=generation,
                )
            except Exception:  # jinja's raise_exception
                got = None
            assert got == expected, (name, messages, generation)


@pytest.mark.skipif(
    GO is None, reason="needs Go, whose text/template renders Ollama's TEMPLATE (apt-get install golang-go)"
)
def test_ollama_template_renders_like_training_in_go(tmp_path):
    """Every named template's Modelfile TEMPLATE, rendered by Go's text/template as Ollama renders it
    (with the Modelfile's SYSTEM as a first system message where the conversation has none), gives
    `render`'s text for generating the next reply. Go templates cannot strip whitespace, so templates
    that strip messages get stripped messages; ChatGLM2's round numbers get no TEMPLATE at all."""
    tokenizer = tiny_tokenizer()
    cases, expected = [], []
    for name, template in sorted(TEMPLATES.items()):
        go = go_template(template, tokenizer, add_bos=False)
        if go is None:
            assert "{idx}" in template.user_format, name
            continue
        for messages in CONVERSATIONS:
            if template.strip_content:
                messages = [m._replace(content=m.content.strip()) for m in messages]
            try:
                text = render(template, tokenizer, messages, add_generation_prompt=messages[-1].role == "user").text
            except ValueError:
                continue  # refused by the template (a system prompt where there is no system role)
            if messages[0].role != "system" and template.default_system is not None:
                messages = [Message("system", template.default_system), *messages]
            system = "\n\n".join(m.content for m in messages if m.role == "system")
            sent = [{"Role": m.role, "Content": m.content} for m in messages]
            cases.append({"Template": go, "System": system, "Messages": sent})
            expected.append((name, text))
    (tmp_path / "render.go").write_text(GO_RENDERER)
    proc = subprocess.run(
        [GO, "run", "render.go"], input=json.dumps(cases), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    for (name, text), got in zip(expected, json.loads(proc.stdout), strict=True):
        assert got == text, name


def test_embedding_rows_beyond_the_tokenizer_are_unused_pad_tokens(tmp_path):
    """An embedding larger than the vocabulary (grown to a multiple of 64, or padded like Qwen's): the
    file lists one token per row, the extra ones `[PAD<id>]` of type UNUSED, and loads back exactly."""
    tokenizer = tiny_tokenizer()
    source = save_model(tmp_path / "m", "llama", tokenizer, "chatml", rows=512)
    path = tmp_path / "padded.gguf"
    assert export("--model", source, "--output", path, "--dtype", "f32") == 0
    fields = gguf.GGUFReader(str(path)).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    size = max(tokenizer.get_vocab().values()) + 1
    assert size < 512 and len(tokens) == 512
    assert tokens[size] == f"[PAD{size}]" and set(types[size:]) == {gguf.TokenType.UNUSED}
    ids = torch.arange(0, size).unsqueeze(0)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert relative_error(logits(load_gguf(path), ids), logits(reference, ids)) < TOLERANCE["f32"]


def test_gemma_norms_are_stored_plus_one_for_llama_cpp(tmp_path, tiny_gemma_dir):
    """Gemma (1): transformers' GGUF reader cannot load the `gemma` architecture, so the file is checked
    tensor by tensor: llama.cpp's names, norms stored as 1 + w, no separate output head."""
    path = tmp_path / "gemma.gguf"
    assert export("--model", tiny_gemma_dir, "--output", path, "--dtype", "f32", "--template", "gemma") == 0
    source = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32).state_dict()
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in tensors
    np.testing.assert_array_equal(
        tensors["blk.1.attn_norm.weight"], source["model.layers.1.input_layernorm.weight"] + 1
    )
    np.testing.assert_array_equal(tensors["output_norm.weight"], source["model.norm.weight"] + 1)
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"], source["model.layers.0.self_attn.v_proj.weight"])


def test_llama3_rope_scaling_becomes_llama_cpps_rope_freqs(tmp_path):
    """Llama-3.1's RoPE scaling, which transformers' reader ignores: the file holds llama.cpp's
    rope_freqs, 1 for the high frequencies and `factor` for the low ones."""
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), num_attention_heads=1, num_key_value_heads=1, **COMMON)
    config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    path = tmp_path / "l3.gguf"
    assert export("--model", tmp_path / "m", "--output", path, "--template", "chatml") == 0
    factors = next(np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    assert factors.shape == (16,)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)


# ---------------------------------------------------------------- adapters


def _train(root: Path, model_dir: Path, mode: str) -> Path:
    out = root / mode
    values = base_config(model_dir, out, train_mode=mode, max_prompt_length=64, max_steps=4)
    run(load_config(["--train_args_file", str(write_config(root / f"{mode}.json", **values))]))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {mode: _train(root, tiny_llama_dir, mode) for mode in ("lora", "qlora")}


def test_adapter_is_merged_on_the_fly(adapters, tiny_llama_dir, tmp_path):
    """--adapter_dir: base + adapter merged in fp32, the run's template (chatml) in the file."""
    from peft import PeftModel

    path = tmp_path / "run.gguf"
    assert export("--adapter_dir", adapters["lora"], "--output", path, "--dtype", "f32") == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.arange(3, 60).unsqueeze(0)
    base_logits = logits(base, ids)
    reference = logits(PeftModel.from_pretrained(base, adapters["lora"]), ids)
    assert relative_error(reference, base_logits) > 1e-3  # the adapter changes the model: the check can fail
    assert relative_error(logits(load_gguf(path), ids), reference) < TOLERANCE["f32"]
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    expected = render(get_template("chatml"), back, CONVERSATIONS[1]).text
    assert back.apply_chat_template([m.chat_template_dict() for m in CONVERSATIONS[1]], tokenize=False) == expected


def test_qlora_run_is_merged_into_the_weights_it_trained_against(adapters, tmp_path):
    """A QLoRA run is merged into the dequantized 4-bit base (merge.py's default), so the file gives
    what the trained 4-bit model gave."""
    from peft import PeftModel

    from component.inference.merge import adapter_info, trained_quantized_model

    path = tmp_path / "qlora.gguf"
    assert export("--adapter_dir", adapters["qlora"], "--output", path, "--dtype", "f32") == 0
    trained = PeftModel.from_pretrained(
        trained_quantized_model(adapter_info(str(adapters["qlora"]))), adapters["qlora"]
    )
    ids = torch.arange(3, 60).unsqueeze(0)
    assert relative_error(logits(load_gguf(path), ids), logits(trained, ids)) < 1e-4


def test_trains_from_the_exported_file(exported, tmp_path):
    """Our GGUF reader agrees too: train.py fine-tunes (2 LoRA steps) from the exported file."""
    path = exported["llama"][1]["f16"]
    out = tmp_path / "again"
    values = base_config(path, out, template_name="llama3", max_steps=2, max_prompt_length=64)
    run(load_config(["--train_args_file", str(write_config(tmp_path / "c.json", **values))]))
    meta = json.loads((out / META_FILE).read_text())
    assert meta["finished"] and meta["base_model_gguf_file"] == path.name


# ---------------------------------------------------------------- the file as other tools see it


def _dump(path: Path) -> dict:
    proc = subprocess.run([str(GGUF_DUMP), "--json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)["metadata"]


def test_gguf_dump_lists_the_keys_an_inference_engine_needs(exported):
    path = exported["qwen3"][1]["q8_0"]
    keys = _dump(path)
    for key in (
        "general.architecture",
        "general.file_type",
        "qwen3.context_length",
        "qwen3.embedding_length",
        "qwen3.block_count",
        "qwen3.attention.head_count",
        "qwen3.attention.head_count_kv",
        "qwen3.attention.key_length",
        "qwen3.attention.layer_norm_rms_epsilon",
        "qwen3.rope.freq_base",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ):
        assert key in keys, key
    assert keys["general.architecture"]["value"] == "qwen3"
    assert keys["general.file_type"]["value"] == gguf.LlamaFileType.MOSTLY_Q8_0
    gemma2 = _dump(exported["gemma2"][1]["f16"])  # keys transformers' reader ignores, for llama.cpp
    source = AutoModelForCausalLM.from_pretrained(exported["gemma2"][0]).config
    assert gemma2["gemma2.attn_logit_softcapping"]["value"] == source.attn_logit_softcapping
    assert gemma2["gemma2.final_logit_softcapping"]["value"] == source.final_logit_softcapping
    assert gemma2["gemma2.attention.sliding_window"]["value"] == source.sliding_window


def test_modelfile_has_template_system_and_stop(exported):
    path = exported["qwen2"][1]["f16"]
    text = path.with_suffix(".Modelfile").read_text()
    assert f"FROM ./{path.name}" in text
    assert '"<|im_start|>user\\n"' in text  # ChatML in Go template syntax
    assert 'SYSTEM """You are a helpful assistant."""' in text  # qwen2's default system prompt
    assert 'PARAMETER stop "<|im_end|>"' in text


# ---------------------------------------------------------------- refusals


def test_script_offers_exactly_the_dtypes_the_export_writes():
    from component.inference.gguf_export import DTYPES as WRITTEN

    assert set(export_gguf.DTYPE_CHOICES) == set(WRITTEN)


def _no_partial_files(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


def test_unsupported_architecture_is_named(tmp_path, tiny_bloom_dir):
    """Through the script from another folder, as a user runs it: a message, exit status 2, no traceback."""
    out = tmp_path / "out"
    out.mkdir()
    script = ROOT / "script" / "export_gguf.py"
    argv = [sys.executable, str(script), "--model", str(tiny_bloom_dir), "--output", str(out / "b.gguf")]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "not supported yet: bloom" in proc.stderr and "Traceback" not in proc.stderr
    _no_partial_files(out, set())


def test_existing_output_is_refused_without_force(exported, tmp_path, capsys):
    source = exported["llama"][0]
    path = tmp_path / "m.gguf"
    path.write_text("mine")
    assert export("--model", source, "--output", path) == 2
    assert "already exists" in capsys.readouterr().err and path.read_text() == "mine"
    _no_partial_files(tmp_path, {"m.gguf"})
    assert export("--model", source, "--output", path, "--force") == 0
    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == "llama"


def test_unfinished_run_is_refused(adapters, tmp_path, capsys):
    run_dir = shutil.copytree(adapters["lora"], tmp_path / "run")
    meta = json.loads((run_dir / META_FILE).read_text())
    (run_dir / META_FILE).write_text(json.dumps({**meta, "finished": False}))
    assert export("--adapter_dir", run_dir, "--output", tmp_path / "r.gguf") == 2
    assert "not a finished run" in capsys.readouterr().err
    assert not (tmp_path / "r.gguf").exists()


def test_full_disk_is_refused_before_writing(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - 4096, 4096))
    assert export("--model", exported["llama"][0], "--output", tmp_path / "m.gguf") == 2
    assert "not enough free disk space" in capsys.readouterr().err
    _no_partial_files(tmp_path, set())


def test_error_while_writing_leaves_no_partial_file(exported, tmp_path, monkeypatch):
    calls = []

    def failing(self, tensor, *args, **kwargs):
        calls.append(tensor.nbytes)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(self, tensor, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError):
        export("--model", exported["llama"][0], "--output", tmp_path / "m.gguf")
    assert len(calls) == 3
    _no_partial_files(tmp_path, set())


# ---------------------------------------------------------------- the demo loop


@pytest.mark.slow
def test_demo_loop_smollm2_gguf_to_lora_to_gguf(tmp_path):
    """SmolLM2-135M from its GGUF -> a short LoRA run -> export f16 -> reload: the greedy reply to the
    demo prompt equals the merged model's token for token; train.py fine-tunes from the new file."""
    from script import merge_lora

    gguf_base = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
    if not gguf_base.exists():
        pytest.skip("the demo model is not installed (bash script/setup.sh)")

    def demo_run(out: Path, steps: int, *extra: str) -> None:
        argv = ["--train_args_file", str(ROOT / "train_args" / "smollm2-135m-sft-lora.json"), *extra]
        argv += ["--output_dir", str(out), "--max_steps", str(steps), "--report_to", "none", "--save_steps", "100"]
        run(load_config(argv))

    run_dir = tmp_path / "run"
    demo_run(run_dir, 4)
    merged = tmp_path / "merged"
    assert merge_lora.main(["--adapter_dir", str(run_dir), "--output_dir", str(merged), "--dtype", "fp32"]) == 0
    path = tmp_path / "smollm2-sft.f16.gguf"
    assert export("--adapter_dir", run_dir, "--output", path, "--dtype", "f16") == 0
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents() == "smollm"  # the base GGUF's own

    prompt = [{"role": "user", "content": "Give me three tips for writing clear emails."}]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reference_tokenizer = AutoTokenizer.from_pretrained(merged)
    expected = render(get_template("smollm"), reference_tokenizer, [Message("user", prompt[0]["content"])], True)
    assert ids["input_ids"][0].tolist() == reference_tokenizer(expected.text, add_special_tokens=False).input_ids

    def reply(model):
        out = model.generate(**ids, max_new_tokens=64, do_sample=False)
        return out[0, ids["input_ids"].shape[1] :].tolist()

    ours = reply(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    theirs = reply(load_gguf(path))
    print(f"\nmerged: {reference_tokenizer.decode(ours)!r}\ngguf f16: {tokenizer.decode(theirs)!r}")
    assert theirs == ours

    again = tmp_path / "again"
    demo_run(again, 2, "--model_name_or_path", str(path))
    assert json.loads((again / META_FILE).read_text())["finished"]
