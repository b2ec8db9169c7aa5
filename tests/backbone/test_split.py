"""The lower/upper split is exact for every family, against transformers' own forward."""
import pytest
import torch
from transformers import AutoModel

from weights.checkpoint import Checkpoint, CheckpointError
from engine.backbone.split import LowerEncoder, UpperEncoder, split_checkpoint

TEXTS = ["bought latte coffee", "searched running shoes for the big red movie", "toy", "a b c d e f g h i j k l"]


def _hf_states(folder, texts):
    ckpt = Checkpoint(folder)
    enc = ckpt.tokenizer(texts, padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return ckpt, enc, out


@pytest.mark.parametrize("num_lower_layers", [0, 1, 3, 4])
def test_lower_matches_hidden_states_and_upper_completes_the_model(family_checkpoint, num_lower_layers):
    family, folder = family_checkpoint
    ckpt, enc, out = _hf_states(folder, TEXTS)
    lower, upper = split_checkpoint(ckpt, num_lower_layers)
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        token_states = lower(enc["input_ids"], enc["attention_mask"])
        final = upper(token_states, mask.sum(1))
    torch.testing.assert_close(token_states[mask], out.hidden_states[num_lower_layers][mask], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(final[mask], out.last_hidden_state[mask], rtol=1e-5, atol=2e-5)
    assert not any(p.requires_grad for p in lower.parameters())
    assert all(p.requires_grad for p in upper.parameters())
    assert len(upper.layers) == 4 - num_lower_layers


def test_padded_positions_are_zero_and_do_not_leak(tiny_checkpoints):
    lower, _ = split_checkpoint(tiny_checkpoints["llama"], 2)
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    enc = ckpt.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    alone = ckpt.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        batched = lower(enc["input_ids"], enc["attention_mask"])
        single = lower(alone["input_ids"], alone["attention_mask"])
    n = alone["input_ids"].shape[1]
    torch.testing.assert_close(batched[0, :n], single[0], rtol=1e-5, atol=1e-6)
    assert batched[0, n:].abs().sum() == 0


def test_left_padding_is_refused(tiny_checkpoints):
    lower, _ = split_checkpoint(tiny_checkpoints["bert"], 1)
    ids = torch.tensor([[0, 2, 40, 3]])
    with pytest.raises(ValueError, match="right-padded"):
        lower(ids, torch.tensor([[0, 1, 1, 1]]))


def test_upper_rebuilt_from_its_state_dict_is_identical(tiny_checkpoints):
    ckpt = Checkpoint(tiny_checkpoints["qwen2"])
    upper = UpperEncoder.from_checkpoint(ckpt, 1)
    state = {f"upper.{k}": v for k, v in upper.state_dict().items()}
    rebuilt = UpperEncoder(ckpt.config, 1, UpperEncoder.has_bias_from_state(list(state), "upper.layers.", 3))
    rebuilt.load_state_dict(upper.state_dict())
    x = torch.randn(2, 5, ckpt.hidden_size)
    lengths = torch.tensor([5, 2])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, lengths), upper(x, lengths), rtol=0, atol=0)


def test_behavior_sequences_far_beyond_bert_positions(tiny_checkpoints):
    """BERT's upper layers take positions from the engine, not from its 128/512-entry table."""
    upper = UpperEncoder.from_checkpoint(Checkpoint(tiny_checkpoints["bert"]), 2)
    x = torch.randn(1, 2000, upper.hidden_size)
    with torch.no_grad():
        out = upper(x, torch.tensor([2000]))
    assert out.shape == (1, 2000, upper.hidden_size) and torch.isfinite(out).all()


def test_num_lower_layers_out_of_range(tiny_checkpoints):
    with pytest.raises(ValueError, match=r"num_lower_layers must be in \[0, 4\]"):
        LowerEncoder(Checkpoint(tiny_checkpoints["bert"]), 5)


def test_fingerprint_depends_on_weights_and_split(tiny_checkpoints, tmp_path):
    from tests.tiny_models import make_tiny_checkpoint
    ckpt = Checkpoint(tiny_checkpoints["bert"])
    other = Checkpoint(make_tiny_checkpoint(tmp_path / "other", "bert", seed=1))
    assert LowerEncoder(ckpt, 2).fingerprint == LowerEncoder(ckpt, 2).fingerprint
    assert LowerEncoder(ckpt, 2).fingerprint != LowerEncoder(ckpt, 1).fingerprint
    assert LowerEncoder(ckpt, 2).fingerprint != LowerEncoder(other, 2).fingerprint


def test_missing_upper_layer_is_a_clear_error(tiny_checkpoints, tmp_path):
    from engine.backbone.split import save_lower_checkpoint
    ckpt = Checkpoint(tiny_checkpoints["llama"])
    lower = LowerEncoder(ckpt, 2)
    save_lower_checkpoint(ckpt, lower, tmp_path / "lower")
    partial = Checkpoint(tmp_path / "lower")
    assert LowerEncoder(partial, 2).fingerprint == lower.fingerprint
    with pytest.raises(CheckpointError, match="layer 2 is missing"):
        UpperEncoder.from_checkpoint(partial, 2)
