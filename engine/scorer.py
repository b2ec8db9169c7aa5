"""`BAHEScorer`: the public scoring API over a saved scorer folder.

Folder layout (written by `save_pretrained`):
  scorer.json            ScorerConfig + format version + model signature + the names of the parts below
  backbone/              config, tokenizer and the frozen lower layers' tensors (for on-the-fly ABE)
  model.safetensors      trained upper layers, behavior positions, empty-sequence vectors, CTR head
  behaviors.safetensors  behavior table (one row per unique behavior text)
  items.safetensors      item table
Each part has a second name (`backbone.1`, `model.1.safetensors`, ...). Saving over a scorer writes
every part under the name the current scorer.json does not use, then replaces scorer.json (temp file,
fsync, rename): that rename commits the save, so a crash at any moment leaves the old or the new
scorer, never a mix. The parts the new scorer.json does not name are removed afterwards.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.abe import AtomicEncoder, ReusingEncoder
from engine.config import ScorerConfig, ScoringConfig
from engine.model import BAHEModel, PackedBatch
from engine.stages import stage
from kernels import ops
from weights.atomic import atomic_write, copy_atomic, file_lock, remove_stale_temps
from weights.checkpoint import Checkpoint
from weights.registry import resolve_model
from engine.backbone.split import UpperEncoder, save_lower_checkpoint
from weights.table import (EMBEDDING_DTYPES, MISSING, BehaviorTable, NonFiniteRowError, TableError, TextEncoder, UnknownTextError,
                           first_nonfinite_row)
from weights.text_key import normalize_text
from weights.safetensors_io import source_of, write_safetensors

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: scorer.json names its parts ("files"); version-1 folders use the first names
SCORER_FILE, MODEL_FILE, BACKBONE = "scorer.json", "model.safetensors", "backbone"
BEHAVIORS_FILE, ITEMS_FILE = "behaviors.safetensors", "items.safetensors"
PARTS = {"backbone": (BACKBONE, "backbone.1"), "model": (MODEL_FILE, "model.1.safetensors"),
         "behaviors": (BEHAVIORS_FILE, "behaviors.1.safetensors"), "items": (ITEMS_FILE, "items.1.safetensors")}
FIRST_NAMES = {part: names[0] for part, names in PARTS.items()}
PROB_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps]: always strictly inside (0, 1)


class InputError(ValueError):
    """Users or items passed to `score` are malformed; the message names the offending field."""


class ScorerFormatError(ValueError):
    """The folder is not a loadable scorer (missing files, unknown or future format)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _read_scorer_json(path: Path) -> tuple[ScorerConfig, dict[str, str]]:
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
        config = ScorerConfig.from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise ScorerFormatError(f"{meta_path}: bad config ({err})") from None
    files = meta.get("files", FIRST_NAMES) if version >= 2 else FIRST_NAMES
    if not isinstance(files, dict) or set(files) != set(PARTS) or any(
            files[part] not in names for part, names in PARTS.items()):
        raise ScorerFormatError(f"{meta_path}: files {files!r} must name each of {sorted(PARTS)} by one of "
                                f"its names {PARTS}")
    return config, dict(files)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _encoder(ckpt: Checkpoint, config: ScorerConfig, device: torch.device | str, progress: bool) -> AtomicEncoder:
    settings = config.encoder
    return AtomicEncoder.from_checkpoint(ckpt, settings.num_lower_layers, max_tokens=settings.max_tokens,
                                         token_budget=settings.token_budget, pooling=settings.pooling, device=device,
                                         progress=progress)


def open_or_build_table(path: Path, texts: Sequence[str], encoder: TextEncoder, dtype: str,
                        kind: str) -> BehaviorTable:
    """Open the table at `path` (it must come from the same model split) and append the texts it
    lacks, or build it when absent."""
    if path.exists():
        table = BehaviorTable.open(path, encoder)
        table.append(texts)
        return table
    return BehaviorTable.build(path, texts, encoder, dtype=dtype, kind=kind)


class BAHEScorer:
    """Scores (user, item) pairs: p = sigmoid(head(BA(user's sequences), item)).

    A user is a dict mapping sequence names (config.model.sequence_names) to behavior texts, oldest
    first; only the most recent `max_behaviors` of each sequence are used (longer ones are truncated
    by design). Behavior and item texts not in the tables are encoded on the fly with the frozen
    lower layers (or refused, per ScoringConfig). Safe to call from several threads."""

    def __init__(self, *, config: ScorerConfig, checkpoint: Checkpoint, encoder: AtomicEncoder, model: BAHEModel,
                 behaviors: BehaviorTable, items: BehaviorTable, device: str | torch.device = "auto",
                 kernels: str = "auto") -> None:
        self.config = config
        self.checkpoint, self.encoder, self.behaviors, self.items = checkpoint, encoder, behaviors, items
        self.device = resolve_device(device)
        if kernels not in ops.BACKENDS:
            raise ValueError(f"kernels must be one of {ops.BACKENDS}, got {kernels!r}")
        self.kernels = kernels
        self.model = model.to(self.device).eval()
        self.encoder.lower.to(self.device)
        self.encoder.device = self.device
        self._tables_lock = threading.Lock()
        self._placed: dict[str, tuple[int, torch.Tensor]] = {}

    # ----- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "auto", kernels: str = "auto",
                        dtype: str = "float32", scoring: ScoringConfig | None = None) -> BAHEScorer:
        """Open a folder written by `save_pretrained` (tables memory-mapped, not read)."""
        path = Path(path)
        config, files = _read_scorer_json(path)
        missing = [name for name in files.values() if not (path / name).exists()]
        if missing:
            raise ScorerFormatError(f"{path}: scorer files {missing} named in {SCORER_FILE} are missing")
        if scoring is not None:
            config.scoring = scoring
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}")
        ckpt = Checkpoint(path / files["backbone"])
        lower_layers = config.encoder.num_lower_layers
        encoder = _encoder(ckpt, config, "cpu", progress=True)
        model_path = path / files["model"]
        try:
            state = load_file(str(model_path))
            num_upper = ckpt.num_layers - lower_layers
            upper = UpperEncoder(ckpt.config, lower_layers, UpperEncoder.has_bias_from_state(
                list(state), "upper.layers.", num_upper))
            model = BAHEModel(upper, config.model)
            model.load_state_dict(state)
        except (SafetensorError, RuntimeError, ValueError, IndexError) as err:
            raise ScorerFormatError(f"{model_path}: not the weights of this scorer's model ({err})") from None
        model.to(EMBEDDING_DTYPES[dtype])
        behaviors = BehaviorTable.open(path / files["behaviors"], encoder)
        items = BehaviorTable.open(path / files["items"], encoder)
        return cls(config=config, checkpoint=ckpt, encoder=encoder, model=model, behaviors=behaviors, items=items,
                   device=device, kernels=kernels)

    @classmethod
    def create(cls, model: str | Path, *, behavior_texts: Sequence[str], item_texts: Sequence[str],
               tables_dir: str | Path, config: ScorerConfig | None = None, device: str | torch.device = "auto",
               kernels: str = "auto", progress: bool = True) -> BAHEScorer:
        """A fresh (untrained) scorer on a base model ('minilm', 'smollm2' or a local folder): builds the
        behavior and item tables in `tables_dir` with ABE, or opens them there and appends only the
        texts they lack, and takes the upper layers from the checkpoint."""
        config = config or ScorerConfig()
        ckpt = Checkpoint(resolve_model(model))
        lower_layers = config.encoder.num_lower_layers
        encoder = _encoder(ckpt, config, resolve_device(device), progress)
        tables_dir = Path(tables_dir)
        dtype = config.encoder.table_dtype
        behaviors = open_or_build_table(tables_dir / BEHAVIORS_FILE, behavior_texts, encoder, dtype, "behavior")
        items = open_or_build_table(tables_dir / ITEMS_FILE, item_texts, ReusingEncoder(encoder, behaviors), dtype,
                                    "item")
        bahe = BAHEModel(UpperEncoder.from_checkpoint(ckpt, lower_layers), config.model)
        return cls(config=config, checkpoint=ckpt, encoder=encoder, model=bahe, behaviors=behaviors, items=items,
                   device=device, kernels=kernels)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the scorer folder crash-safely (see the module docstring): every part under the name
        the current scorer.json does not use, each file by temp file + fsync + rename, then scorer.json,
        which commits the save. Parts already in the folder (a scorer saved over itself) are kept."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with file_lock(path / SCORER_FILE):
            try:
                live = _read_scorer_json(path)[1]
            except ScorerFormatError:
                live = FIRST_NAMES if (path / SCORER_FILE).exists() else {}
            sources = {"backbone": self.checkpoint.folder, "model": None, "behaviors": self.behaviors.path,
                       "items": self.items.path}
            files = {}
            for part, names in PARTS.items():
                source = sources[part]
                if source is not None and source.parent.resolve() == path.resolve() and source.name in names:
                    files[part] = source.name  # already here, e.g. a scorer saved over the folder it came from
                    continue
                files[part] = names[1] if live.get(part) == names[0] else names[0]
                target = path / files[part]
                _remove(target)  # named by no scorer.json: a leftover of a killed save
                remove_stale_temps(target)
                if part == "backbone":
                    save_lower_checkpoint(self.checkpoint, self.encoder.lower, target)
                elif part == "model":
                    state = {k: v.detach().float().cpu().contiguous() for k, v in self.model.state_dict().items()}
                    with atomic_write(target) as handle:
                        write_safetensors(handle, [source_of(k, v) for k, v in state.items()], {"format": "pt"})
                else:
                    copy_atomic(source, target)
            meta = {"format": "bahe-scorer", "format_version": FORMAT_VERSION, "config": self.config.to_dict(),
                    "signature": self.encoder.signature.to_metadata(), "files": files}
            remove_stale_temps(path / SCORER_FILE)
            with atomic_write(path / SCORER_FILE) as handle:
                handle.write(json.dumps(meta, indent=2).encode())
            for part, names in PARTS.items():  # committed: drop the parts of the previous save
                for name in names:
                    if name != files[part]:
                        _remove(path / name)
                        remove_stale_temps(path / name)

    # ----- scoring ------------------------------------------------------------------------
    def score(self, users: Sequence[dict[str, Sequence[str]]], items: Sequence[str]) -> np.ndarray:
        """(B,) float32 click probabilities in (0, 1) of users[i] clicking items[i]."""
        sequences = self._parse_users(users)
        item_texts = self._parse_items(items, len(sequences))
        if not sequences:
            return np.empty(0, dtype=np.float32)
        n = len(self.config.model.sequence_names)
        flat = [text for user in sequences for seq in user for text in seq]
        lengths = np.fromiter((len(seq) for user in sequences for seq in user), dtype=np.int64,
                              count=len(sequences) * n)
        with self._tables_lock, stage("lookup"), ops.use_backend(self.kernels):  # unknown texts: ABE on the fly
            behavior_rows, behavior_extra = self._rows(self.behaviors, flat, self.config.scoring.unknown_behavior,
                                                       "behavior", lengths, n)
            item_rows, item_extra = self._rows(self.items, item_texts, self.config.scoring.unknown_item, "item")
            behavior_table, item_table = self.table_rows("behaviors"), self.table_rows("items")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return self._score_packed(behavior_table, item_table, behavior_rows, offsets, item_rows,
                                  behavior_extra, item_extra)

    def score_ids(self, behavior_rows: torch.Tensor, offsets: torch.Tensor, item_rows: torch.Tensor) -> np.ndarray:
        """Id-level API: behavior_rows (T,) int64 table rows; offsets (U*n+1,) int64 cumulative, user-major
        (sequence s of user u is [offsets[u*n+s], offsets[u*n+s+1]), in config.model.sequence_names order,
        each at most max_behaviors long); item_rows (U,) int64. -> (U,) float32 probabilities."""
        n = len(self.config.model.sequence_names)
        batch = PackedBatch(behavior_rows, offsets, item_rows)
        batch.validate(n, len(self.behaviors), len(self.items))  # the one check of the values, on the host
        longest = batch.max_len
        if longest > self.config.model.max_behaviors:
            raise ValueError(f"a sequence holds {longest} behaviors, more than max_behaviors "
                             f"{self.config.model.max_behaviors}; keep the most recent ones")
        return self._score_packed(self.table_rows("behaviors"), self.table_rows("items"),
                                  behavior_rows.cpu().numpy(), offsets.cpu().numpy(), item_rows.cpu().numpy())

    def _score_packed(self, behavior_table: torch.Tensor, item_table: torch.Tensor, behavior_rows: np.ndarray,
                      offsets: np.ndarray, item_rows: np.ndarray, behavior_extra: torch.Tensor | None = None,
                      item_extra: torch.Tensor | None = None) -> np.ndarray:
        n, users = len(self.config.model.sequence_names), item_rows.shape[0]
        out = np.empty(users, dtype=np.float32)
        step = self.config.scoring.batch_size
        with torch.inference_mode(), ops.use_backend(self.kernels):
            for start in range(0, users, step):
                stop = min(start + step, users)
                lo, hi = offsets[start * n], offsets[stop * n]
                chunk = offsets[start * n:stop * n + 1] - lo
                longest = int(np.diff(chunk).max()) if chunk.size > 1 else 0  # on the host: the forward reads no device value
                batch = PackedBatch(torch.from_numpy(behavior_rows[lo:hi]), torch.from_numpy(chunk),
                                    torch.from_numpy(item_rows[start:stop]), behavior_extra, item_extra,
                                    max_len=longest).to(self.device)
                logits = self.model(behavior_table, item_table, batch)
                out[start:stop] = torch.sigmoid(logits).float().cpu().numpy()
        if not np.isfinite(out).all():
            raise FloatingPointError("the model produced a non-finite score; the scorer's weights may be corrupt")
        return np.clip(out, PROB_EPS, 1 - PROB_EPS)

    # ----- helpers --------------------------------------------------------------------------
    def table_rows(self, which: str) -> torch.Tensor:
        """(N, d) rows of the 'behaviors' or 'items' table where the model runs: on CUDA placed once
        per table size (on the device, or pinned host memory when it does not fit); mmapped on CPU."""
        table = self.behaviors if which == "behaviors" else self.items
        cached = self._placed.get(which)
        if cached is not None and cached[0] == len(table):
            return cached[1]
        rows = table.embeddings
        if self.device.type == "cuda":
            from engine.placement import place_table
            rows, placement = place_table(rows, self.device)
            log.info("%s table (%d x %d) placed: %s", which, len(table), table.dim, placement)
        self._placed[which] = (len(table), rows)
        return rows

    def _rows(self, table: BehaviorTable, texts: list[str], policy: str, what: str,
              lengths: np.ndarray | None = None, n: int = 1) -> tuple[np.ndarray, torch.Tensor | None]:
        """Table rows of texts; unknown texts encoded on the fly (ids >= N, returned as extra rows),
        appended to the table, or refused, per policy. Locates malformed texts for the error; table
        errors (corrupt file, hash collision) pass through as they are."""
        try:
            rows = table.lookup(texts, on_missing="mark")
        except TableError:
            raise
        except (TypeError, ValueError) as err:
            located = self._locate_bad_text(texts, what, lengths, n, normalize_text)
            raise InputError(located or f"{what} texts: {err}") from None
        missing = np.nonzero(rows == MISSING)[0]
        if not missing.size:
            return rows, None
        normalized = [normalize_text(texts[i]) for i in missing]
        unknown = list(dict.fromkeys(normalized))
        if policy == "error":
            raise UnknownTextError(f"{len(unknown)} {what} text(s) not in {table.path}, e.g. {unknown[0]!r} "
                                   f"(unknown_{what}='error')")
        try:
            if self.config.scoring.append_unknown:
                table.append(unknown)  # rows only ever get appended: the known texts' rows stand
                rows[missing] = table.lookup(normalized, on_missing="raise")
                return rows, None
            extra = self.encoder.encode(unknown)
        except TableError:
            raise
        except ValueError:  # a text the tokenizer turns into no tokens at all
            located = self._locate_bad_text(texts, what, lengths, n, self._check_encodable)
            if located is None:
                raise
            raise InputError(located) from None
        bad = first_nonfinite_row(extra)
        if bad is not None:
            raise NonFiniteRowError(f"encoding {what} text {unknown[bad]!r} gave NaN or Inf")
        slot = {t: len(table) + i for i, t in enumerate(unknown)}
        rows[missing] = [slot[t] for t in normalized]
        return rows, extra.to(self.device)

    def _check_encodable(self, text: str) -> None:
        self.encoder.tokenize([normalize_text(text)])

    def _locate_bad_text(self, texts: list[str], what: str, lengths: np.ndarray | None, n: int,
                         check: Callable[[object], object]) -> str | None:
        """'users[u][name] behavior j: <why>' (or 'items[i]: <why>') for the first text `check` refuses."""
        for i, text in enumerate(texts):
            try:
                check(text)
            except (TypeError, ValueError) as bad:
                if lengths is None:
                    return f"items[{i}]: {bad}"
                seq_index = int(np.searchsorted(np.cumsum(lengths), i, side="right"))
                user, seq = divmod(seq_index, n)
                name = self.config.model.sequence_names[seq]
                position = i - int(np.sum(lengths[:seq_index]))
                return f"users[{user}][{name!r}] behavior {position} (after truncation to the most recent): {bad}"
        return None

    def _parse_users(self, users: object) -> list[list[list[str]]]:
        """users -> per user, per sequence name (config order), the most recent M texts."""
        if not isinstance(users, (list, tuple)):
            raise InputError(f"users must be a list of dicts, got {type(users).__name__}")
        names, limit = self.config.model.sequence_names, self.config.model.max_behaviors
        known = set(names)
        parsed = []
        for i, user in enumerate(users):
            if not isinstance(user, dict):
                raise InputError(f"users[{i}] must be a dict of sequence name -> list of behavior texts, got "
                                 f"{type(user).__name__}")
            extra = set(user) - known
            if extra and self.config.scoring.unknown_sequence == "error":
                raise InputError(f"users[{i}] has unknown sequence name(s) {sorted(map(str, extra))}; expected "
                                 f"{list(names)} (set scoring.unknown_sequence='ignore' to skip them)")
            row = []
            for name in names:
                seq = user.get(name, ())
                if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)):
                    raise InputError(f"users[{i}][{name!r}] must be a list of behavior texts, got {type(seq).__name__}")
                row.append(list(seq[-limit:]))
            parsed.append(row)
        return parsed

    @staticmethod
    def _parse_items(items: object, num_users: int) -> list[str]:
        if not isinstance(items, (list, tuple)):
            raise InputError(f"items must be a list of item texts, got {type(items).__name__}")
        if len(items) != num_users:
            raise InputError(f"items has {len(items)} entries but users has {num_users}: one item per user")
        return list(items)
