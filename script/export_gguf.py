"""Export a fine-tuned model to one GGUF file (llama.cpp, Ollama, LM Studio), with an Ollama Modelfile.

    python script/export_gguf.py --adapter_dir output/RUN --output RUN.gguf --dtype f16
    python script/export_gguf.py --model output/RUN-merged --output RUN.q8_0.gguf --dtype q8_0

An adapter is merged on the fly in fp32 (QLoRA into the dequantized 4-bit weights it trained
against). The chat template comes from the run's training_meta.json (--template overrides it) and
is written as Jinja in the file; the Modelfile (F.Modelfile beside F.gguf) has Ollama's TEMPLATE,
SYSTEM and stop tokens. An existing output is refused without --force. Nothing is pushed anywhere.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_verbose_argument, run_main

DTYPE_CHOICES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")  # component.inference.gguf_export.DTYPES


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="A merged or full model folder (or a .gguf file).")
    source.add_argument("--adapter_dir", help="A finished LoRA/QLoRA run: merged into its base on the fly.")
    p.add_argument("--output", required=True, help="The GGUF file to write (F.gguf; F.Modelfile goes beside it).")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="f16", help="Type of the weight matrices (default f16).")
    p.add_argument("--template", help="Chat template name; default: the one recorded at training time.")
    p.add_argument("--force", action="store_true", help="Replace an existing output file and Modelfile.")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)

    def export() -> None:
        from component.inference.gguf_export import export_gguf

        export_gguf(a.output, a.model, a.adapter_dir, a.dtype, a.force, a.template)

    return run_main(export, verbose=a.verbose)


if __name__ == "__main__":
    sys.exit(main())
