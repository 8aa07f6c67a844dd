"""The output folder: what a finished run leaves, and guarding it.

A finished run writes `training_meta.json` (template, base model, modes), which
later tools read so that the user never retypes them. The base model is recorded
by its absolute path (a hub id as it is), and a GGUF base also by its file name
(`from_pretrained(folder, gguf_file=...)`), so the folder works from any directory.
A folder that holds a finished run is never written into again unless
`overwrite_output_dir` is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from component.config import Config
from component.errors import ConfigError
from component.model.loading import absolute_location, resolve_location

META_FILE = "training_meta.json"


def finished_run(output_dir: str) -> bool:
    meta = read_meta(output_dir)
    return bool(meta and meta.get("finished"))


def check_output_dir(config: Config) -> None:
    """Refuse to write over a finished run; call before creating anything."""
    out = config.output_dir
    if finished_run(out) and not config.method.overwrite_output_dir:
        raise ConfigError(
            f"{config.source}: key 'output_dir': {out!r} already holds a finished run. "
            "Choose another output_dir, or set overwrite_output_dir: true to replace it."
        )


def write_meta(config: Config, output_dir: str, finished: bool, **extra: Any) -> Path:
    base = config.model.model_name_or_path
    gguf_file = resolve_location(base).gguf_file
    meta = {
        "base_model": absolute_location(base),
        **({"base_model_gguf_file": gguf_file} if gguf_file else {}),
        "template_name": config.data.template_name,
        "task_type": config.method.task_type,
        "train_mode": config.method.train_mode,
        "max_seq_length": config.data.max_seq_length,
        "finished": finished,
        **extra,
    }
    path = Path(output_dir) / META_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(directory: str) -> Optional[dict[str, Any]]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
