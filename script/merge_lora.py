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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger  # noqa: E402

from component.errors import USER_ERROR_EXIT_CODE, UserError  # noqa: E402
from component.inference import DTYPES  # noqa: E402
from component.logs import setup_logging  # noqa: E402
from component.merge import (  # noqa: E402
    DEFAULT_QLORA_MERGE_BASE,
    MERGE_BASES,
    adapter_info,
    check_output_dir,
    load_merge_tokenizer,
    merge,
    save_merged,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter_dir", required=True, help="Folder of a trained adapter (train_mode lora or qlora).")
    p.add_argument("--output_dir", required=True, help="Where the merged model goes; must be empty unless --force.")
    p.add_argument("--base_model", help="Base model (hub id, folder or .gguf); default: from the adapter's metadata.")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="Saved precision; default: the training precision.")
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


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        info = adapter_info(args.adapter_dir, args.base_model)
        check_output_dir(args.output_dir, args.force, args.adapter_dir, info.base_model)
        tokenizer = load_merge_tokenizer(info)
        logger.info(f"merging {info.train_mode} adapter {info.adapter_dir} into {info.base_model}")
        result = merge(info, tokenizer, args.qlora_merge_base, measure_all=not args.skip_check)
        out = save_merged(result, info, tokenizer, args.output_dir, args.dtype or info.train_dtype)
    except UserError as exc:
        logger.error(str(exc))
        return USER_ERROR_EXIT_CODE
    for name, error in result.errors.items():
        if result.merge_base is None:
            print(f"relative logit error, merged model vs base + adapter: {error:.3e}")
        else:
            chosen = " (saved)" if name == result.merge_base else ""
            print(f"relative logit error, merged into {name} weights vs trained 4-bit model: {error:.3e}{chosen}")
    print(f"merged model saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
