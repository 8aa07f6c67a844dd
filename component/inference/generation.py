"""Loading a trained model for inference, and streaming its replies.

`load_for_inference` takes a full model folder, a merged output, or a base
model plus a LoRA adapter, and finds what the user should not have to retype
in `training_meta.json`: the chat template, and an adapter's base model.

`generate` renders the conversation with the template, runs transformers'
`generate` in a worker thread and yields text pieces as tokens arrive. It
stops at the template's stop token(s) and at extra stop strings, never
yielding either, and stops within one token when `cancel` is set or the
consumer closes the iterator (e.g. after Ctrl-C).
"""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from component.config import ModelArguments
from component.data.template import Message, Template, TemplateError, generation_prompt, stop_token_ids
from component.data.tokenizer_template import AutoTemplate
from component.errors import UserError
from component.training.outputs import read_meta

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The flag chat, serve and evaluate take a template name with (component/cli.py's model flags).
TEMPLATE_FLAG = "--template"
# How often the consumer wakes up while waiting for a token (keeps Ctrl-C prompt).
POLL_SECONDS = 0.1
REPLACEMENT_CHAR = "\ufffd"  # what decode gives for an incomplete UTF-8 sequence


class InferenceError(UserError):
    """A model, adapter or template for inference cannot be found or used."""


@dataclass
class LoadedModel:
    """A model ready to generate, with the tokenizer and template it was trained with."""

    model: PreTrainedModel
    tokenizer: object
    template: Template | AutoTemplate
    name: str


# ---------------------------------------------------------------- loading


def is_adapter_dir(path: Optional[str]) -> bool:
    return bool(path) and (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base_model(adapter_dir: str) -> str:
    """The base model an adapter was trained on: our metadata first, then peft's config."""
    meta = read_meta(adapter_dir) or {}
    if meta.get("base_model"):
        return meta["base_model"]
    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    if config_path.is_file():
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
        if base:
            return base
    raise InferenceError(
        f"{adapter_dir}: cannot tell which base model this adapter belongs to "
        f"(no base_model in training_meta.json or {ADAPTER_CONFIG}); pass the base model explicitly"
    )


def recorded_template_name(template_name: Optional[str], *dirs: Optional[str]) -> str:
    """The given template name, else the one recorded in the first folder that has metadata."""
    name = template_name
    for d in dirs:
        if name is None and d:
            name = (read_meta(d) or {}).get("template_name")
    if name is None:
        shown = ", ".join(d for d in dirs if d)
        raise InferenceError(
            f"no template recorded in training_meta.json of {shown}; pass a template name with {TEMPLATE_FLAG} NAME "
            "(or 'auto' for the tokenizer's own chat_template)"
        )
    return name


def resolve_template(template_name: Optional[str], tokenizer, *dirs: Optional[str]) -> Template | AutoTemplate:
    """The template to chat with: given, or recorded at training time; checked against the tokenizer."""
    from component.data.tokenizer_template import resolve_template as resolve_for_tokenizer

    name = recorded_template_name(template_name, *dirs)
    try:
        return resolve_for_tokenizer(name, tokenizer, where=f"the tokenizer of {dirs[0] or dirs[-1]}")
    except UserError as exc:
        # The data layer names train.py's key; here the template comes from the flag or from the run.
        said = str(exc).removeprefix("key 'template_name': ").replace("template_name", TEMPLATE_FLAG)
        if template_name is not None:
            raise InferenceError(f"{TEMPLATE_FLAG} {name!r}: {said}") from None
        raise InferenceError(
            f"template {name!r} (recorded at training time): {said}; pass {TEMPLATE_FLAG} NAME to use another"
        ) from None


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InferenceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(model_dir: str, dtype: torch.dtype, load_in_4bit: bool = False) -> PreTrainedModel:
    """A base model in `dtype` on the inference device, or in 4 bits with `dtype` as compute dtype."""
    from component.model.loading import load_base_model, read_model_type

    args = ModelArguments(model_name_or_path=model_dir)
    if not load_in_4bit:
        return _load_or_explain(model_dir, lambda: load_base_model(args, dtype)).to(inference_device())
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InferenceError("loading in 4 bits needs bitsandbytes: pip install bitsandbytes")
    from component.model.quantization import keep_training_matmul, quantized_load_kwargs

    model_type = _load_or_explain(model_dir, lambda: read_model_type(args))
    model = _load_or_explain(
        model_dir, lambda: load_base_model(args, dtype, **quantized_load_kwargs(model_type, dtype))
    )
    keep_training_matmul(model)
    return model


def _load_or_explain(location: str, load):
    try:
        return load()
    except (OSError, ValueError) as exc:
        raise InferenceError(f"cannot load model {location!r}: {exc}") from None


def load_tokenizer_from(*dirs: Optional[str]):
    """The tokenizer saved with the run (adapter folder) if there is one, else the model's."""
    from component.model.loading import load_tokenizer

    for d in dirs:
        if d and ((Path(d) / TOKENIZER_CONFIG).is_file() or not Path(d).is_dir()):
            args = ModelArguments(model_name_or_path=d)
            return _load_or_explain(d, lambda: load_tokenizer(args))  # noqa: B023 (called at once)
    raise InferenceError(f"no tokenizer found in {', '.join(d for d in dirs if d)}")


def load_for_inference(
    model_dir: Optional[str],
    adapter_dir: Optional[str] = None,
    template_name: Optional[str] = None,
    dtype: str = "fp32",
    load_in_4bit: bool = False,
) -> LoadedModel:
    """Load a full/merged model, or a base plus an adapter (an adapter folder alone also works)."""
    if adapter_dir is None and is_adapter_dir(model_dir):
        adapter_dir, model_dir = model_dir, None
    if adapter_dir is not None and not is_adapter_dir(adapter_dir):
        raise InferenceError(f"{adapter_dir}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    if model_dir is None:
        if adapter_dir is None:
            raise InferenceError("give a model folder, an adapter folder, or both")
        model_dir = adapter_base_model(adapter_dir)
    if not Path(model_dir).exists() and Path(model_dir).is_absolute():
        raise InferenceError(f"model {model_dir!r} not found")
    tokenizer = load_tokenizer_from(adapter_dir, model_dir)
    template = resolve_template(template_name, tokenizer, adapter_dir, model_dir)
    model = load_base(model_dir, parse_dtype(dtype), load_in_4bit)
    from component.model.loading import fit_embeddings

    fit_embeddings(model, tokenizer)  # tokens the run added (add_special_tokens): the run's tokenizer has them
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    name = f"{model_dir} + {adapter_dir}" if adapter_dir else model_dir
    return LoadedModel(model, tokenizer, template, name)


@dataclass(frozen=True)
class ModelSource:
    """What chat, serve and evaluate are told to load (their shared flags), before it is loaded."""

    model: Optional[str]
    """Full or merged model folder, hub id or .gguf; with `adapter`, the base model (an adapter folder alone works)."""
    adapter: Optional[str] = None
    """LoRA/QLoRA adapter folder to apply to `model`."""
    template: Optional[str] = None
    """Chat template name; None: the one recorded at training time."""
    dtype: str = "fp32"
    """One of DTYPES."""
    load_in_4bit: bool = False
    """Load the base model in 4-bit NF4 (bitsandbytes)."""

    def load(self) -> LoadedModel:
        return load_for_inference(self.model, self.adapter, self.template, self.dtype, self.load_in_4bit)


# ---------------------------------------------------------------- generating


class _TokenQueue(BaseStreamer):
    """Receives new token ids from `generate` (skipping the prompt) and queues them."""

    END = None

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for tok in value.reshape(-1).tolist():
            self.queue.put(tok)

    def end(self):
        self.queue.put(self.END)


class _StopWhenSet(StoppingCriteria):
    def __init__(self, *events: Optional[threading.Event]):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids, scores, **kwargs):
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def _find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may begin a stop string (not safe to yield yet)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def _generation_config(
    loaded: LoadedModel, max_new_tokens: int, temperature: float, top_p: float, stop_ids: list[int]
) -> GenerationConfig:
    tok = loaded.tokenizer
    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        eos_token_id=stop_ids or None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (stop_ids or [0])[0],
    )


def generate(
    loaded: LoadedModel,
    messages: Sequence[Message],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Optional[list[str]] = None,
    cancel: Optional[threading.Event] = None,
) -> Iterator[str]:
    """Stream the next assistant reply as text pieces. temperature 0 is greedy."""
    tok = loaded.tokenizer
    try:
        prompt = generation_prompt(loaded.template, tok, list(messages))
    except TemplateError as exc:
        raise InferenceError(str(exc)) from None
    stop_ids = stop_token_ids(loaded.template, tok)
    stops = [s for s in [*(stop or []), loaded.template.stop_text(tok)] if s]
    device = next(loaded.model.parameters()).device
    input_ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    streamer, done = _TokenQueue(), threading.Event()
    failure: list[BaseException] = []

    def work():
        try:
            with torch.inference_mode():
                loaded.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=_generation_config(loaded, max_new_tokens, temperature, top_p, stop_ids),
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(done, cancel)]),
                    streamer=streamer,
                )
        except BaseException as exc:  # re-raised in the consumer's thread
            failure.append(exc)
        finally:
            streamer.end()

    thread = threading.Thread(target=work, name="generate", daemon=True)
    thread.start()
    try:
        yield from _stream_text(tok, streamer.queue, set(stop_ids), stops, done, cancel)
        if failure:
            raise failure[0]
    finally:
        done.set()
        thread.join()


def _next_token(q: queue.Queue, cancel: Optional[threading.Event]):
    while True:
        if cancel is not None and cancel.is_set():
            return _TokenQueue.END
        try:
            return q.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue


def _stream_text(
    tok, q: queue.Queue, stop_ids: set[int], stops: list[str], done: threading.Event, cancel: Optional[threading.Event]
) -> Iterator[str]:
    generated: list[int] = []
    emitted = 0
    text = ""
    while True:
        token = _next_token(q, cancel)
        if token is _TokenQueue.END or token in stop_ids:
            break
        generated.append(token)
        text = tok.decode(generated, skip_special_tokens=False)
        cut = _find_stop(text, stops)
        if cut is not None:
            if cut > emitted:
                yield text[emitted:cut]
            done.set()
            return
        safe = len(text) - _held_back(text, stops)
        if text[:safe].endswith(REPLACEMENT_CHAR):
            continue  # a multi-byte character is still arriving
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    done.set()
    if len(text) > emitted and not (cancel is not None and cancel.is_set()):
        yield text[emitted:]
