"""Weight files that are safe to load: pickled weights are refused unless the user allows them.

A `.bin`/`.pt` weight file is a Python pickle, and loading one can run
arbitrary code. A model folder or checkpoint that holds weights only in that
form is refused unless `allow_pickle_weights` is set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

SAFETENSORS_SUFFIX = ".safetensors"
# Weight files in Python's pickle format: loading one can run arbitrary code.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The Trainer's own state files. They are pickles too, but transformers loads
# them with torch's weights_only unpickler, which only rebuilds tensors and
# plain containers and cannot run code; they are not weights.
TRAINER_STATE_PICKLES = re.compile(r"^(optimizer|scheduler|scaler|rng_state(_\d+)?)\.(pt|pth)$|^training_args\.bin$")


def pickle_weight_files(folder: str | Path) -> list[str]:
    """Weight files in pickle format at the top of `folder`, where from_pretrained and
    the Trainer look (not the Trainer's own weights_only state files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        f.name
        for f in folder.iterdir()
        if f.is_file() and f.suffix in PICKLE_WEIGHT_SUFFIXES and not TRAINER_STATE_PICKLES.match(f.name)
    )


def pickle_problem(folder: str | Path, what: str, allowed: bool) -> Optional[str]:
    """A refusal naming the pickled weight files of `folder` when it has no safetensors weights."""
    if allowed:
        return None
    folder = Path(folder)
    pickles = pickle_weight_files(folder)
    if not pickles or any(folder.glob(f"*{SAFETENSORS_SUFFIX}")):
        return None
    return (
        f"{what} {str(folder)!r} holds weights only as pickle files ({', '.join(pickles[:3])}), and loading a "
        "pickle can run arbitrary code. Convert them to safetensors, or set allow_pickle_weights: true "
        "if you trust where they came from."
    )


def check_model_pickles(values: dict[str, Any]) -> list[str]:
    """Config check: a local model folder with only pickled weights is refused unless allowed."""
    location = values.get("model_name_or_path")
    if not isinstance(location, str) or location.endswith(".gguf"):
        return []
    problem = pickle_problem(location, "model_name_or_path", bool(values.get("allow_pickle_weights")))
    return [f"key 'model_name_or_path': {problem}"] if problem else []
