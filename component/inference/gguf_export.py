"""Exporting a fine-tuned model to one GGUF file (llama.cpp, Ollama, LM Studio), with an Ollama Modelfile.

    python script/export_gguf.py --adapter_dir output/RUN --output RUN.gguf --dtype f16

The model is a merged or full model folder (`--model`), or a run's adapter merged on the
fly in fp32 by the merge code (QLoRA into the dequantized 4-bit weights it trained against).
What the file holds comes from data, never from the model's name: the architecture table
(gguf_arch.py), the tokenizer (gguf_vocab.py) and the chat template of the run
(training_meta.json), written as Jinja that renders exactly as training did (gguf_template.py,
checked on probe conversations before anything is written). The template's end-of-turn token
is EOS and EOT, so generation stops where training taught it to.

The output is guarded like every other output here: an existing file is refused without
`--force`, free disk space is checked before writing, the file is written under a temporary
name in the same folder and renamed when complete, and nothing is left behind on an error.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import gguf
import numpy as np
from loguru import logger

from component.config import ModelArguments
from component.data.template import Message, Template, TemplateError, render
from component.data.template_registry import TEMPLATES
from component.data.tokenizer_template import AutoTemplate
from component.errors import UserError
from component.inference.generation import is_adapter_dir, load_tokenizer_from, resolve_template
from component.inference.gguf_arch import (
    GgufArchitecture,
    architecture_for,
    check_config,
    gguf_tensors,
    write_hparams,
)
from component.inference.gguf_template import jinja_template, modelfile
from component.inference.gguf_vocab import GgufVocab, gguf_vocab
from component.training.outputs import read_meta

QT = gguf.GGMLQuantizationType
# --dtype -> (type of the 2-D weights, general.file_type). 1-D tensors (norms, biases) stay F32, and a
# weight whose rows do not split into whole blocks falls back to F16, as llama.cpp's converter does.
DTYPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (QT.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
# The output head is the tensor 4 bits hurt most; llama.cpp's quantizer gives it Q6_K, which gguf-py cannot
# write, so it gets Q8_0. SmolLM2-135M after the demo's LoRA, top-1 agreement with the merged model on the
# merge probe: q4_0 63% -> 68%, q4_1 89% -> 93% (relative logit error 0.36 -> 0.38 and 0.19 -> 0.17).
HEAD_TYPE = {QT.Q4_0: QT.Q8_0, QT.Q4_1: QT.Q8_0}
OUTPUT, EMBEDDING = "output.weight", "token_embd.weight"
MODELFILE_SUFFIX = ".Modelfile"
DISK_MARGIN_BYTES = 64 * 2**20  # headroom for the metadata estimate and the filesystem
PROBES = [
    [Message("user", "Hi"), Message("assistant", "Hello!")],
    [Message("system", "Be brief."), Message("user", " What is 2+2? "), Message("assistant", "Four.")],
    [Message("user", "Q1"), Message("assistant", "A1"), Message("user", "Q2")],
]


class ExportError(UserError):
    """The model, run or output of a GGUF export cannot be used."""


@dataclass
class ExportSource:
    """The model to write, with the tokenizer and template it was trained with."""

    model: object
    tokenizer: object
    template: object
    """A named `Template`, the tokenizer's own (`AutoTemplate`), or None (no chat template)."""
    name: str
    base_gguf: Optional[Path]
    """The GGUF file the model came from, if any: its `tokenizer.ggml.pre` is kept."""


@dataclass
class PlannedTensor:
    name: str
    data: Callable[[], np.ndarray]
    qtype: QT
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.shape[-1] // block * type_size


# ---------------------------------------------------------------- checks before any work


def modelfile_path(output: Path) -> Path:
    return output.with_suffix(MODELFILE_SUFFIX)


def check_output(output: Path, force: bool) -> None:
    if output.suffix != ".gguf":
        raise ExportError(f"--output {str(output)!r}: give a file name ending in .gguf")
    if output.is_dir():
        raise ExportError(f"--output {str(output)!r} is a folder; give a file name ending in .gguf")
    for path in (output, modelfile_path(output)):
        if path.exists() and not force:
            raise ExportError(f"--output: {str(path)!r} already exists; choose another name or pass --force")
    if not output.parent.is_dir():
        raise ExportError(f"--output: folder {str(output.parent)!r} does not exist")


def run_meta(model_dir: Optional[str], adapter_dir: Optional[str]) -> dict:
    """The run's training_meta.json (empty for a plain model folder); an unfinished run is refused."""
    if (model_dir is None) == (adapter_dir is None):
        raise ExportError("give exactly one of --model (a merged or full model) and --adapter_dir (a LoRA run)")
    where = adapter_dir or model_dir
    if not Path(where).exists():
        raise ExportError(f"{where!r} not found")
    if adapter_dir is not None and not is_adapter_dir(adapter_dir):
        hint = " (a full fine-tuning run: pass it as --model)" if read_meta(adapter_dir) else ""
        raise ExportError(f"--adapter_dir {adapter_dir!r}: not a LoRA adapter folder (no adapter_config.json){hint}")
    if model_dir is not None and is_adapter_dir(model_dir):
        raise ExportError(f"--model {model_dir!r} holds a LoRA adapter; pass it as --adapter_dir to merge it")
    meta = (read_meta(where) if Path(where).is_dir() else None) or {}
    if meta and not meta.get("finished"):
        raise ExportError(
            f"{where!r} is not a finished run (training_meta.json says finished: false): it stopped or is still "
            "training; export a finished run, or resume it first"
        )
    return meta


def _model_type(location: str) -> str:
    from component.model.loading import read_model_type

    try:
        return read_model_type(ModelArguments(model_name_or_path=location))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the model config of {location!r}: {exc}") from None


# ---------------------------------------------------------------- the model, its tokenizer and template


def _base_gguf(location: str, meta: dict) -> Optional[Path]:
    if location.endswith(".gguf"):
        return Path(location)
    base, name = meta.get("base_model"), meta.get("base_model_gguf_file")
    return Path(base) / name if base and name and (Path(base) / name).is_file() else None


def _load_model(location: str):
    """The model in fp32 on the CPU, where the export reads it."""
    import torch

    from component.model.loading import load_base_model

    try:
        return load_base_model(ModelArguments(model_name_or_path=location), torch.float32)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load model {location!r}: {exc}") from None


def load_source(
    model_dir: Optional[str], adapter_dir: Optional[str], meta: dict, template_name: Optional[str]
) -> ExportSource:
    """The fp32 model (merged on the fly for an adapter), its tokenizer and its template."""
    from component.inference.merge import adapter_info, load_merge_tokenizer, merge

    if adapter_dir is not None:
        info = adapter_info(adapter_dir)
        tokenizer = load_merge_tokenizer(info)
        template = _template(template_name, tokenizer, meta, adapter_dir, info.base_model)
        logger.info(f"merging {info.train_mode} adapter {adapter_dir} into {info.base_model} (fp32)")
        result = merge(info, tokenizer, measure_all=False)
        for base, error in result.errors.items():
            logger.info(f"merge ({base}): relative logit error {error:.3e} against the trained model")
        name, location, model = Path(adapter_dir).name, info.base_model, result.model
    else:
        tokenizer = load_tokenizer_from(model_dir)
        template = _template(template_name, tokenizer, meta, model_dir)
        model = _load_model(model_dir)
        name, location = Path(model_dir).stem, model_dir
    from component.model.loading import fit_embeddings

    fit_embeddings(model, tokenizer)
    return ExportSource(model.eval(), tokenizer, template, name, _base_gguf(location, meta))


def _template(name: Optional[str], tokenizer, meta: dict, *dirs: Optional[str]):
    """--template, else the run's, else the tokenizer's own chat_template, else none."""
    if name is None and meta.get("template_name") is None:
        return _tokenizers_own(tokenizer)
    try:
        return resolve_template(name, tokenizer, *dirs)
    except UserError as exc:
        raise ExportError(str(exc)) from None


def _tokenizers_own(tokenizer) -> Optional[AutoTemplate]:
    """A model that was not trained here: its own chat_template, written as it is. Where no end-of-turn
    token can be found from it (a template training would refuse to mask), EOS stays the tokenizer's."""
    from component.data.tokenizer_template import auto_template

    chat_template = getattr(tokenizer, "chat_template", None)
    if not chat_template:
        logger.warning("no template recorded and no chat_template in the tokenizer: the GGUF gets none")
        return None
    try:
        return auto_template(tokenizer)
    except TemplateError as exc:
        logger.warning(f"the tokenizer's chat_template is written as it is; its end-of-turn token is unknown ({exc})")
        return AutoTemplate(chat_template, stop_word=tokenizer.eos_token)


def chat_template_text(template, tokenizer) -> Optional[str]:
    """The Jinja for tokenizer.chat_template: the tokenizer's own for 'auto', else derived from the
    named template and checked to render the probe conversations exactly as `render` does."""
    if template is None:
        return None
    if not isinstance(template, Template):
        return template.chat_template
    jinja = jinja_template(template, tokenizer)
    for messages in PROBES:
        for generation in (False, True):
            if generation and messages[-1].role != "user":
                continue
            try:
                ours = render(template, tokenizer, messages, add_generation_prompt=generation).text
            except TemplateError:
                continue
            theirs = tokenizer.apply_chat_template(
                [m.chat_template_dict() for m in messages],
                chat_template=jinja,
                tokenize=False,
                add_generation_prompt=generation,
            )
            if theirs != ours:
                raise AssertionError(f"derived Jinja for {template.name!r} renders {theirs!r}, render gives {ours!r}")
    return jinja


def equivalent_named_template(template, tokenizer) -> Optional[Template]:
    """For the tokenizer's own chat_template, a named template that renders the probes identically
    (the Modelfile is written from it), or None."""
    if template is None or isinstance(template, Template):
        return template
    # Our formats put the assistant header in the user turn, so a conversation ending with the user is
    # compared with its generation prompt, as a chat template renders it for generation.
    probes = [(m, m[-1].role == "user") for m in PROBES]
    for candidate in TEMPLATES.values():
        try:
            if all(
                render(candidate, tokenizer, m, add_generation_prompt=g).text
                == template.render(tokenizer, m, add_generation_prompt=g).text
                for m, g in probes
            ):
                return candidate
        except (TemplateError, UserError):
            continue
    return None


# ---------------------------------------------------------------- planning and writing


def plan_tensors(model, arch: GgufArchitecture, qtype: QT) -> list[PlannedTensor]:
    tensors = list(gguf_tensors(model, arch))
    names = {t.name for t in tensors}
    head = OUTPUT if OUTPUT in names else EMBEDDING  # a tied embedding is the output head too
    planned = []
    for name, shape, data in tensors:
        chosen = HEAD_TYPE.get(qtype, qtype) if name == head else qtype
        if len(shape) < 2:
            chosen = QT.F32
        elif shape[-1] % gguf.GGML_QUANT_SIZES[chosen][0]:
            logger.info(f"{name}: rows of {shape[-1]} do not split into {chosen.name} blocks; written as F16")
            chosen = QT.F16
        planned.append(PlannedTensor(name, data, chosen, shape))
    return planned


def _encode(data: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.F32:
        return data.astype(np.float32, copy=False)
    if qtype == QT.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def estimated_bytes(tensors: list[PlannedTensor], vocab: GgufVocab) -> int:
    text = sum(len(t.encode()) + 16 for t in vocab.tokens) + sum(len(m.encode()) + 16 for m in vocab.merges)
    return sum(t.nbytes + gguf.GGUF_DEFAULT_ALIGNMENT for t in tensors) + text + 12 * len(vocab.tokens)


def check_disk(output: Path, needed: int) -> None:
    free = shutil.disk_usage(output.parent).free
    if free < needed + DISK_MARGIN_BYTES:
        raise ExportError(
            f"not enough free disk space in {str(output.parent)!r}: the GGUF file needs about {needed / 2**20:.1f} MiB "
            f"(+{DISK_MARGIN_BYTES // 2**20} MiB headroom), {free / 2**20:.1f} MiB are free"
        )


def write_gguf(
    path: Path,
    arch: GgufArchitecture,
    source: ExportSource,
    tensors: list[PlannedTensor],
    vocab: GgufVocab,
    chat_template: Optional[str],
    dtype: str,
) -> None:
    """Header, metadata and tensor infos, then each tensor converted as it is written."""
    config = source.model.config
    writer = gguf.GGUFWriter(None, arch.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(source.name)
        write_hparams(config, arch, writer, len(vocab.tokens))
        writer.add_file_type(DTYPES[dtype][1])
        if DTYPES[dtype][0] not in (QT.F32, QT.F16, QT.BF16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(writer)
        if chat_template:
            writer.add_chat_template(chat_template)
        for t in tensors:
            dtype_np = {QT.F32: np.float32, QT.F16: np.float16}.get(t.qtype, np.uint8)
            shape = t.shape if t.qtype in (QT.F32, QT.F16) else gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(
                t.name, shape, np.dtype(dtype_np), t.nbytes, None if dtype_np != np.uint8 else t.qtype
            )
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(_encode(t.data(), t.qtype))
    finally:
        writer.close()


def _replace_atomically(writes: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write each file under a temporary name beside it, then rename them all; on any error (Ctrl-C
    too) remove every temporary file, so no partial output is ever left."""
    temps = [(path.with_name(f".{path.name}.{os.getpid()}.tmp"), path, write) for path, write in writes]
    try:
        for temp, _, write in temps:
            write(temp)
        for temp, path, _ in temps:
            os.replace(temp, path)
    finally:
        for temp, _, _ in temps:
            temp.unlink(missing_ok=True)


# ---------------------------------------------------------------- the command (script/export_gguf.py)


def export_gguf(
    output: str,
    model_dir: Optional[str] = None,
    adapter_dir: Optional[str] = None,
    dtype: str = "f16",
    force: bool = False,
    template_name: Optional[str] = None,
    out: Optional[TextIO] = None,
) -> Path:
    """Check everything that can be checked before loading, load (or merge), plan, check the disk, write."""
    started = time.monotonic()
    output_path, meta, arch = check_inputs(output, model_dir, adapter_dir, dtype, force)
    source = load_source(model_dir, adapter_dir, meta, template_name)
    check_config(source.model.config, arch)
    stop = source.template.stop_text(source.tokenizer) if source.template is not None else None
    n_vocab = source.model.get_input_embeddings().num_embeddings
    vocab = gguf_vocab(source.tokenizer, n_vocab, stop, pre=_base_pre(source.base_gguf))
    chat_template = chat_template_text(source.template, source.tokenizer)
    tensors = plan_tensors(source.model, arch, DTYPES[dtype][0])
    check_disk(output_path, estimated_bytes(tensors, vocab))
    described = f"template {getattr(source.template, 'name', None)!r}, {dtype}"
    ollama = equivalent_named_template(source.template, source.tokenizer)
    text = modelfile(output_path.name, ollama, source.tokenizer, [stop] if stop else [], vocab.add_bos, described)
    logger.info(f"writing {len(tensors)} tensors ({arch.name}, {dtype}) to {output_path}")
    _replace_atomically(
        [
            (output_path, lambda p: write_gguf(p, arch, source, tensors, vocab, chat_template, dtype)),
            (modelfile_path(output_path), lambda p: p.write_text(text, encoding="utf-8")),
        ]
    )
    out = out or sys.stdout
    size, seconds = output_path.stat().st_size / 2**20, time.monotonic() - started
    out.write(f"GGUF written to {output_path} ({size:.1f} MiB, {dtype}, {seconds:.1f} s)\n")
    out.write(f"Ollama: ollama create NAME -f {modelfile_path(output_path)}\n")
    return output_path


def check_inputs(
    output: str, model_dir: Optional[str], adapter_dir: Optional[str], dtype: str, force: bool
) -> tuple[Path, dict, GgufArchitecture]:
    """Everything refused before a weight is loaded: the dtype, the output, the run, the architecture."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    output_path = Path(output).absolute()
    check_output(output_path, force)
    meta = run_meta(model_dir, adapter_dir)
    if model_dir is not None and Path(model_dir).resolve() == output_path.resolve():
        raise ExportError(f"--output {output!r} is the model being exported; choose another file name")
    location = model_dir if model_dir is not None else _adapter_base(adapter_dir)
    return output_path, meta, architecture_for(_model_type(location))


def _adapter_base(adapter_dir: str) -> str:
    from component.inference.generation import adapter_base_model

    return adapter_base_model(adapter_dir)


def _base_pre(base_gguf: Optional[Path]) -> Optional[str]:
    """`tokenizer.ggml.pre` of the GGUF the model came from: llama.cpp's own name for its text splitting."""
    if base_gguf is None:
        return None
    field = gguf.GGUFReader(str(base_gguf)).get_field(gguf.Keys.Tokenizer.PRE)
    return field.contents() if field is not None else None
