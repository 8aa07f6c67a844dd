"""Merge a LoRA/QLoRA adapter into a full-precision copy of its base model.

    python script/merge_lora.py --adapter_dir output/run --output_dir output/run-merged

The base model comes from the adapter's training_meta.json unless
--base_model is given. The merge is done in fp32 on the CPU, then saved as
safetensors in --dtype (default: the precision the adapter was trained in),
with the tokenizer and training_meta.json, so chat.py needs no other flags.
For QLoRA adapters both merge bases are measured against the trained
(4-bit + adapter) model and the errors printed. Nothing is pushed anywhere.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from component.cli import add_verbose_argument, run_main
from component.inference.generation import DTYPES
from component.inference.merge import DEFAULT_QLORA_MERGE_BASE, MERGE_BASES, merge_adapter


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_verbose_argument(p)
    p.add_argument("--adapter_dir", required=True, help="Folder of a trained adapter (train_mode lora or qlora).")
    p.add_argument("--output_dir", required=True, help="Where the merged model goes; must be empty unless --force.")
    p.add_argument("--base_model", help="Base model (hub id, folder or .gguf); default: from the adapter's metadata.")
    p.add_argument("--dtype", choices=list(DTYPES), help="Saved precision; default: the training precision.")
    p.add_argument("--force", action="store_true", help="Write into a non-empty --output_dir.")
    p.add_argument(
        "--qlora_merge_base",
        choices=MERGE_BASES,
        default=DEFAULT_QLORA_MERGE_BASE,
        help="QLoRA only: merge into the dequantized 4-bit weights the adapter was trained against "
        "(default, exact) or into the original weights.",
    )
    p.add_argument(
        "--skip_check",
        action="store_true",
        help="QLoRA only: measure the chosen merge base only (saves one model copy of memory).",
    )
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    return run_main(
        lambda: merge_adapter(
            a.adapter_dir, a.output_dir, a.base_model, a.dtype, a.force, a.qlora_merge_base, not a.skip_check
        ),
        verbose=a.verbose,
    )


if __name__ == "__main__":
    sys.exit(main())
