"""The scorer folder format: read and validate scorer.json, write a folder crash-safely.

Folder layout (written by `write_folder`):
  scorer.json            ScorerConfig + format version + model signature + the names of the parts below
  backbone/              config, tokenizer and the frozen lower layers' tensors (for on-the-fly ABE)
  model.safetensors      trained upper layers, behavior positions, empty-sequence vectors, CTR head
  behaviors.safetensors  behavior table (one row per unique behavior text)
  items.safetensors      item table
  item_vectors.safetensors  the item tower's output per item-table row, signed (engine.item_vectors); optional:
                         folders written before format 4 lack it and compute the vectors on load
Each part has a second name (`backbone.1`, `model.1.safetensors`, ...). Saving over a scorer writes
every part under the name the current scorer.json does not use, then replaces scorer.json (temp file,
fsync, rename): that rename commits the save, so a crash at any moment leaves the old or the new
scorer, never a mix. The parts the new scorer.json does not name are removed afterwards.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from collections.abc import Callable

import torch

from engine.abe import AtomicEncoder
from engine.backbone.split import save_lower_checkpoint
from engine.config import ScorerConfig
from weights.atomic import atomic_write, copy_atomic, file_lock, remove_stale_temps
from weights.checkpoint import Checkpoint
from weights.safetensors_io import source_of, write_safetensors

FORMAT_VERSION = 4  # 2: scorer.json names its parts ("files"); 3: CTR-model keys (config.LEGACY_MODEL);
                    # 4: the optional item_vectors part
SCORER_FILE, MODEL_FILE, BACKBONE = "scorer.json", "model.safetensors", "backbone"
BEHAVIORS_FILE, ITEMS_FILE, ITEM_VECTORS_FILE = "behaviors.safetensors", "items.safetensors", "item_vectors.safetensors"
PARTS = {"backbone": (BACKBONE, "backbone.1"), "model": (MODEL_FILE, "model.1.safetensors"),
         "behaviors": (BEHAVIORS_FILE, "behaviors.1.safetensors"), "items": (ITEMS_FILE, "items.1.safetensors"),
         "item_vectors": (ITEM_VECTORS_FILE, "item_vectors.1.safetensors")}
OPTIONAL = {"item_vectors"}
FIRST_NAMES = {part: names[0] for part, names in PARTS.items() if part not in OPTIONAL}


class ScorerFormatError(ValueError):
    """The folder is not a loadable scorer (missing files, unknown or future format)."""


def read_scorer_json(path: Path) -> tuple[ScorerConfig, dict[str, str]]:
    """(config, part -> file name) of the scorer folder `path`; ScorerFormatError for anything unusable."""
    meta_path = path / SCORER_FILE
    if not meta_path.is_file():
        raise ScorerFormatError(f"{path} is not a scorer folder: {SCORER_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_bytes())
        if not isinstance(meta, dict) or meta.get("format") != "bahe-scorer":
            raise ValueError(f"format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                             "expected 'bahe-scorer'")
        version = int(meta["format_version"])
    except (ValueError, KeyError, TypeError) as err:
        raise ScorerFormatError(f"{meta_path}: unreadable ({err})") from None
    if version > FORMAT_VERSION:
        raise ScorerFormatError(f"{meta_path}: format version {version} is newer than this engine's "
                                f"{FORMAT_VERSION}; upgrade bahe-engine")
    try:
        config = ScorerConfig.from_dict(meta["config"], version)
    except (ValueError, KeyError, TypeError) as err:
        raise ScorerFormatError(f"{meta_path}: bad config ({err})") from None
    files = meta.get("files", FIRST_NAMES) if version >= 2 else FIRST_NAMES
    if not isinstance(files, dict) or not set(FIRST_NAMES) <= set(files) <= set(PARTS) or any(
            files[part] not in PARTS[part] for part in files):
        raise ScorerFormatError(f"{meta_path}: files {files!r} must name each of {sorted(FIRST_NAMES)} (and "
                                f"may name {sorted(OPTIONAL)}) by one of its names {PARTS}")
    return config, dict(files)


def open_folder(path: Path) -> tuple[ScorerConfig, dict[str, Path]]:
    """(config, part -> path) of the scorer folder `path`, every part present; ScorerFormatError if not."""
    config, files = read_scorer_json(path)
    missing = [name for name in files.values() if not (path / name).exists()]
    if missing:
        raise ScorerFormatError(f"{path}: scorer files {missing} named in {SCORER_FILE} are missing")
    return config, {part: path / name for part, name in files.items()}


def write_folder(path: Path, *, config: ScorerConfig, checkpoint: Checkpoint, encoder: AtomicEncoder,
                 model: torch.nn.Module, behaviors: Path, items: Path,
                 item_vectors: Callable[[Path], None] | None = None) -> None:
    """Write the scorer folder crash-safely (see the module docstring): every part under the name the
    current scorer.json does not use, each file by temp file + fsync + rename, then scorer.json, which
    commits the save. Parts already in the folder (a scorer saved over itself) are kept. `behaviors` and
    `items` are the table files to copy; `item_vectors(target)` writes that part (atomically), if given."""
    path.mkdir(parents=True, exist_ok=True)
    with file_lock(path / SCORER_FILE):
        try:
            live = read_scorer_json(path)[1]
        except ScorerFormatError:
            live = FIRST_NAMES if (path / SCORER_FILE).exists() else {}
        sources = {"backbone": checkpoint.folder, "model": None, "behaviors": behaviors, "items": items}
        files = {}
        for part, names in PARTS.items():
            if part == "item_vectors" and item_vectors is None:
                continue
            source = sources.get(part)
            if source is not None and source.parent.resolve() == path.resolve() and source.name in names:
                files[part] = source.name  # already here, e.g. a scorer saved over the folder it came from
                continue
            files[part] = names[1] if live.get(part) == names[0] else names[0]
            target = path / files[part]
            _remove(target)  # named by no scorer.json: a leftover of a killed save
            remove_stale_temps(target)
            if part == "backbone":
                save_lower_checkpoint(checkpoint, encoder.lower, target)
            elif part == "item_vectors":
                item_vectors(target)
            elif part == "model":
                state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
                with atomic_write(target) as handle:
                    write_safetensors(handle, [source_of(k, v) for k, v in state.items()], {"format": "pt"})
            else:
                copy_atomic(source, target)
        meta = {"format": "bahe-scorer", "format_version": FORMAT_VERSION, "config": config.to_dict(),
                "signature": encoder.signature.to_metadata(), "files": files}
        remove_stale_temps(path / SCORER_FILE)
        with atomic_write(path / SCORER_FILE) as handle:
            handle.write(json.dumps(meta, indent=2).encode())
        for part, names in PARTS.items():  # committed: drop the parts of the previous save
            for name in names:
                if name != files.get(part):
                    _remove(path / name)
                    remove_stale_temps(path / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
