"""ABE rows equal transformers' own hidden_states[L], masked-mean over each text's real tokens."""
import numpy as np
import pytest
import torch
from transformers import AutoModel

from engine.encoding.abe import AtomicEncoder
from weights.checkpoint import Checkpoint
from weights.table import BehaviorTable

TEXTS = ["bought latte coffee", "searched running shoes for the big red movie", "toy", "liked star wars",
         "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9"]


@pytest.mark.parametrize("num_lower_layers", [1, 3])
def test_rows_equal_hf_hidden_states_mean_of_each_text_alone(family_checkpoint, num_lower_layers):
    family, folder = family_checkpoint
    ckpt = Checkpoint(folder)
    encoder = AtomicEncoder.from_checkpoint(ckpt, num_lower_layers, max_tokens=24, token_budget=40, progress=False)
    rows = encoder.encode(TEXTS)
    hf = AutoModel.from_pretrained(folder).eval()
    first = 0 if family == "bert" else 1  # decoders skip the attention-sink first token
    assert encoder.signature.pooling == ("mean" if family == "bert" else "mean_after_first")
    for text, row in zip(TEXTS, rows):
        enc = ckpt.tokenizer(text, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            states = hf(**enc, output_hidden_states=True).hidden_states[num_lower_layers][0]
        torch.testing.assert_close(row, states[first if len(states) > 1 else 0:].mean(0), rtol=1e-5, atol=2e-5)


def test_truncation_and_batch_independence(tiny_checkpoints):
    ckpt = Checkpoint(tiny_checkpoints["bert"])
    encoder = AtomicEncoder.from_checkpoint(ckpt, 2, max_tokens=8, progress=False)
    _, lengths = encoder.tokenize(TEXTS)
    assert lengths.max() == 8
    together = encoder.encode(TEXTS)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(encoder.encode([text])[0], together[i], rtol=1e-5, atol=1e-6)
    assert encoder.encode([]).shape == (0, ckpt.hidden_size)


def test_batches_respect_the_token_budget(tiny_checkpoints):
    encoder = AtomicEncoder.from_checkpoint(Checkpoint(tiny_checkpoints["llama"]), 1, token_budget=10, progress=False)
    lengths = np.array([3, 9, 1, 4, 4, 2, 7])
    batches = encoder._batches(lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    assert all(lengths[b].sum() <= 10 or b.size == 1 for b in batches)
    assert [lengths[b].max() for b in batches] == sorted(lengths[b].max() for b in batches)


def test_table_built_by_abe_matches_its_encoder(tiny_checkpoints, tmp_path):
    ckpt = Checkpoint(tiny_checkpoints["qwen2"])
    encoder = AtomicEncoder.from_checkpoint(ckpt, 2, progress=False)
    table = BehaviorTable.build(tmp_path / "t.safetensors", TEXTS + TEXTS[:2], encoder)
    assert len(table) == len(TEXTS)
    torch.testing.assert_close(table.embeddings, encoder.encode(TEXTS), rtol=1e-5, atol=1e-6)
    other = AtomicEncoder.from_checkpoint(ckpt, 1, progress=False)
    with pytest.raises(ValueError, match="num_lower_layers 2 does not match the model's num_lower_layers 1"):
        BehaviorTable.open(tmp_path / "t.safetensors", other)


def test_plain_mean_pooling_is_available_for_decoders(tiny_checkpoints):
    """pooling='mean' averages every token, the attention-sink first one included."""
    folder = tiny_checkpoints["qwen2"]
    ckpt = Checkpoint(folder)
    encoder = AtomicEncoder.from_checkpoint(ckpt, 2, pooling="mean", progress=False)
    assert encoder.signature.pooling == "mean"
    hf = AutoModel.from_pretrained(folder).eval()
    enc = ckpt.tokenizer(TEXTS[0], truncation=True, max_length=encoder.max_tokens, return_tensors="pt")
    with torch.no_grad():
        states = hf(**enc, output_hidden_states=True).hidden_states[2][0]
    assert len(states) > 1
    torch.testing.assert_close(encoder.encode([TEXTS[0]])[0], states.mean(0), rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="pooling must be"):
        AtomicEncoder.from_checkpoint(ckpt, 2, pooling="max")


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2"])
def test_rows_depend_on_the_other_texts_of_the_call_only_in_the_last_bits(tiny_checkpoints, family):
    """The bound the AtomicEncoder docstring states: each text alone, all together and under small token
    budgets (other batch cuts, other attention buckets) give the same rows up to BATCH_TOLERANCE of the
    row's largest entry."""
    from engine.encoding.abe import BATCH_TOLERANCE
    ckpt = Checkpoint(tiny_checkpoints[family])
    rng = np.random.default_rng(0)
    words = "bought latte coffee searched running shoes big red movie toy liked star wars heat".split()
    texts = list(dict.fromkeys(" ".join(rng.choice(words, rng.integers(1, 20))) for _ in range(60)))
    together = AtomicEncoder.from_checkpoint(ckpt, 2, progress=False).encode(texts)
    scale = together.abs().amax(1, keepdim=True)
    worst = 0.0
    for budget in (16, 40, 97):
        rows = AtomicEncoder.from_checkpoint(ckpt, 2, token_budget=budget, progress=False).encode(texts)
        worst = max(worst, ((rows - together).abs() / scale).max().item())
    encoder = AtomicEncoder.from_checkpoint(ckpt, 2, progress=False)
    alone = torch.cat([encoder.encode([t]) for t in texts])
    shuffled = [texts[i] for i in rng.permutation(len(texts))]
    again = encoder.encode(shuffled)[[shuffled.index(t) for t in texts]]
    for rows in (alone, again):
        worst = max(worst, ((rows - together).abs() / scale).max().item())
    assert worst <= BATCH_TOLERANCE, worst
