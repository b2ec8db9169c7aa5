"""The scorer folder format: read and validate scorer.json, write a folder crash-safely.

Folder layout (written by `write_folder`):
  scorer.json            ScorerConfig + format version + model signature + the names of the parts below
  backbone/              config, tokenizer and the frozen lower layers' tensors (for on-the-fly ABE)
  model.safetensors      trained upper layers, behavior positions, empty-sequence vectors, CTR head
  behaviors.safetensors  behavior table (one row per unique behavior text)
  items.safetensors      item table
  item_vectors.safetensors  the item tower's output per item-table row, signed (engine.serving.item_vectors); optional:
                         folders written before format 4 lack it and compute the vectors on load
  ids.json               optional: the id vocabulary `bahe train` keeps (weights.id_vocabulary), append-only; not
                         a part of scorer.json: a save never removes it, a save to another folder carries it
Each part has a second name (`backbone.1`, `model.1.safetensors`, ...). Saving over a scorer writes
every part under the name the current scorer.json does not use, then replaces scorer.json (temp file,
fsync, rename): that rename commits the save, so a crash at any moment leaves the old or the new
scorer, never a mix. The parts the new scorer.json does not name are removed afterwards.

What a save keeps is decided from the folder as it is at commit time, under its lock (and the locks of
its table files), never from what the saving object remembers: a part is kept only when the current
scorer.json names it, it is the one the object was loaded from and it still holds the object's data
(same model signature; a table may have grown by appends). Everything else is written afresh from the
object (tables from the rows it holds, the backbone from the bytes read when it was opened).

A part that is a symbolic link pointing outside the folder is refused (ScorerFormatError): a save would
replace the link, not what it points to, and removing old parts must never reach outside the folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from collections.abc import Callable

import torch

from engine.encoding.abe import AtomicEncoder
from engine.backbone.split import save_lower_checkpoint
from engine.config import CONFIG_VERSION, ScorerConfig
from weights import bounded_json
from weights.atomic import atomic_write, file_lock, remove_stale_temps
from weights.checkpoint import Checkpoint
from weights.id_vocabulary import FILE_NAME as ID_FILE
from weights.id_vocabulary import carry_vocabulary
from weights.safetensors_io import source_of, write_safetensors
from weights.table import BehaviorTable, TableError

FORMAT_VERSION = CONFIG_VERSION  # 2: scorer.json names its parts ("files"); 3-6: model keys
                                 # (config.INTRODUCED_MODEL_KEYS); 4: also the optional item_vectors part
SCORER_FILE, MODEL_FILE, BACKBONE = "scorer.json", "model.safetensors", "backbone"
BEHAVIORS_FILE, ITEMS_FILE, ITEM_VECTORS_FILE = "behaviors.safetensors", "items.safetensors", "item_vectors.safetensors"
PARTS = {"backbone": (BACKBONE, "backbone.1"), "model": (MODEL_FILE, "model.1.safetensors"),
         "behaviors": (BEHAVIORS_FILE, "behaviors.1.safetensors"), "items": (ITEMS_FILE, "items.1.safetensors"),
         "item_vectors": (ITEM_VECTORS_FILE, "item_vectors.1.safetensors")}
OPTIONAL = {"item_vectors"}
FIRST_NAMES = {part: names[0] for part, names in PARTS.items() if part not in OPTIONAL}
MAX_SCORER_JSON_BYTES = 1 << 20


class ScorerFormatError(ValueError):
    """The folder is not a loadable scorer (missing files, unknown or future format)."""


def _read_meta(meta_path: Path) -> dict:
    """scorer.json parsed with bounded size and depth; its format and an int format_version checked."""
    try:
        meta = bounded_json.loads(meta_path.read_bytes(), max_bytes=MAX_SCORER_JSON_BYTES)
    except (ValueError, OSError) as err:
        raise ScorerFormatError(f"{meta_path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != "bahe-scorer":
        found = repr(meta.get("format")) if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ScorerFormatError(f"{meta_path}: unreadable (format is {found[:80]}, expected 'bahe-scorer')")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ScorerFormatError(f"{meta_path}: unreadable (format_version must be an integer >= 1, got "
                                f"{version!r})")
    if not isinstance(meta.get("config"), dict):
        raise ScorerFormatError(f"{meta_path}: unreadable (config must be a JSON object, got "
                                f"{type(meta.get('config')).__name__})")
    return meta


def read_scorer_json(path: Path) -> tuple[ScorerConfig, dict[str, str]]:
    """(config, part -> file name) of the scorer folder `path`; ScorerFormatError for anything unusable,
    every config field checked for its type and range (the error names the field)."""
    meta_path = path / SCORER_FILE
    if not meta_path.is_file():
        raise ScorerFormatError(f"{path} is not a scorer folder: {SCORER_FILE} is missing")
    meta = _read_meta(meta_path)
    version = meta["format_version"]
    if version > FORMAT_VERSION:
        raise ScorerFormatError(f"{meta_path}: format version {version} is newer than this engine's "
                                f"{FORMAT_VERSION}; upgrade bahe-engine")
    try:
        config = ScorerConfig.from_dict(meta["config"], version)
    except (ValueError, TypeError) as err:
        raise ScorerFormatError(f"{meta_path}: bad config ({err})") from None
    files = meta.get("files", FIRST_NAMES) if version >= 2 else FIRST_NAMES
    if not isinstance(files, dict) or not set(FIRST_NAMES) <= set(files) <= set(PARTS) or any(
            not isinstance(files[part], str) or files[part] not in PARTS[part] for part in files):
        raise ScorerFormatError(f"{meta_path}: files {files!r} must name each of {sorted(FIRST_NAMES)} (and "
                                f"may name {sorted(OPTIONAL)}) by one of its names {PARTS}")
    return config, dict(files)


def scorer_json_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of the folder's scorer.json, None when absent: every save replaces the file,
    so the stamp changes with each committed save."""
    try:
        info = os.stat(path / SCORER_FILE)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def open_folder(path: Path) -> tuple[ScorerConfig, dict[str, Path]]:
    """(config, part -> path) of the scorer folder `path`, every part present; ScorerFormatError if not."""
    config, files = read_scorer_json(path)
    missing = [name for name in files.values() if not (path / name).exists()]
    if missing:
        raise ScorerFormatError(f"{path}: scorer files {missing} named in {SCORER_FILE} are missing")
    for name in files.values():
        _refuse_outside_links(path, path / name)
    return config, {part: path / name for part, name in files.items()}


def _refuse_outside_links(folder: Path, part: Path) -> None:
    """ScorerFormatError if `part`, or anything inside it, is a symbolic link that leads out of `folder`."""
    root = folder.resolve()
    for entry in [part, *(part.rglob("*") if part.is_dir() and not part.is_symlink() else [])]:
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise ScorerFormatError(f"{entry} is a symbolic link to {os.readlink(entry)}, outside the scorer folder "
                                    f"{folder}; copy the file in instead")


def write_folder(path: Path, *, config: ScorerConfig, checkpoint: Checkpoint, encoder: AtomicEncoder,
                 model: torch.nn.Module, behaviors: BehaviorTable, items: BehaviorTable,
                 item_vectors: Callable[[Path], None] | None = None,
                 ids: tuple[Path, bytes] | None = None) -> None:
    """Write the scorer folder crash-safely (see the module docstring): every part under the name the
    current scorer.json does not use, each file by temp file + fsync + rename, then scorer.json, which
    commits the save. A part the folder already holds for this scorer (saved over itself) is kept; what
    to keep is read from the folder under its lock. `item_vectors(target)` writes that part (atomically),
    if given; it is always written afresh. `ids`: (the folder the scorer came from, the bytes of its `ids.json`
    then): carried into another folder (weights.id_vocabulary.carry_vocabulary) just before the commit, after a
    check before any part is written (an id whose text differs there: IdError, the folder left as it was)."""
    path.mkdir(parents=True, exist_ok=True)
    tables = {"behaviors": behaviors, "items": items}
    if ids is not None and ids[0].resolve() == path.resolve():
        ids = None  # its own folder: the ids.json there is this scorer's, or later extended
    with contextlib.ExitStack() as locks:
        locks.enter_context(file_lock(path / SCORER_FILE))
        for part in tables:  # appenders to the folder's tables wait: a kept table is not replaced meanwhile
            for name in PARTS[part]:
                locks.enter_context(file_lock(path / name))
        if ids is not None:
            carry_vocabulary(ids[1], ids[0] / ID_FILE, path, write=False)
        live, live_signature = _live_parts(path)
        files = {}
        for part, names in PARTS.items():
            if part == "item_vectors" and item_vectors is None:
                continue
            if _keeps(path, part, live.get(part), live_signature, checkpoint, encoder, tables.get(part)):
                files[part] = live[part]
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
                tables[part].save_copy(target)
        meta = {"format": "bahe-scorer", "format_version": FORMAT_VERSION, "config": config.to_dict(),
                "signature": encoder.signature.to_metadata(), "files": files}
        if ids is not None:  # before the commit: a killed save leaves the old scorer with more ids, never fewer
            carry_vocabulary(ids[1], ids[0] / ID_FILE, path)
        remove_stale_temps(path / SCORER_FILE)
        with atomic_write(path / SCORER_FILE) as handle:
            handle.write(json.dumps(meta, indent=2).encode())
        for part, names in PARTS.items():  # committed: drop the parts of the previous save
            for name in names:
                if name != files.get(part):
                    _remove(path / name)
                    remove_stale_temps(path / name)


def _live_parts(path: Path) -> tuple[dict[str, str], dict | None]:
    """(part -> name, model signature) that the folder's scorer.json names now; for a damaged scorer.json
    the first names (their files are then rewritten, never kept) and no signature."""
    if not (path / SCORER_FILE).exists():
        return {}, None
    try:
        meta = _read_meta(path / SCORER_FILE)
        files = read_scorer_json(path)[1]
    except ScorerFormatError:
        return dict(FIRST_NAMES), None
    return files, meta.get("signature")


def _keeps(path: Path, part: str, live: str | None, live_signature: dict | None, checkpoint: Checkpoint,
           encoder: AtomicEncoder, table: BehaviorTable | None) -> bool:
    """Whether the part the folder's scorer.json names now (`live`) is the one the saving scorer came from
    and still holds its data."""
    source = {"backbone": checkpoint.folder, "model": None}.get(part, table.path if table else None)
    if (live is None or source is None or live_signature is None or source.name != live
            or source.parent.resolve() != path.resolve() or (path / live).is_symlink()):
        return False
    if live_signature != encoder.signature.to_metadata():
        return False  # another model's (or split's) scorer was saved here since
    if part == "backbone":
        on_disk = path / live / "config.json"
        return on_disk.is_file() and on_disk.read_bytes() == checkpoint.small_files.get("config.json")
    return table.extended_on_disk()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
