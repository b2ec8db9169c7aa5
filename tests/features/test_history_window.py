"""The window of a long history (engine.features.history_window): what it keeps, its config and format defaults, and a
scorer that reads the window for its upper layers but the whole history for its counts."""
import numpy as np
import pytest
import torch

from engine import BAHEScorer, EncoderConfig, ModelConfig, ScorerConfig
from engine.features.history_window import window_start


@pytest.mark.parametrize("max_behaviors, step", [(1, 1), (5, 1), (8, 2), (20, 5), (7, 7), (100, 33)])
def test_a_window_keeps_between_m_minus_s_plus_1_and_m_of_the_most_recent(max_behaviors, step):
    lengths = np.arange(0, 5 * max_behaviors + 3)
    start = window_start(lengths, max_behaviors, step)
    kept = lengths - start
    whole = lengths <= max_behaviors
    np.testing.assert_array_equal(start[whole], 0)
    assert (kept[~whole] <= max_behaviors).all() and (kept[~whole] >= max_behaviors - step + 1).all()
    assert (start % step == 0).all() and (np.diff(start) >= 0).all()
    assert [window_start(int(n), max_behaviors, step) for n in lengths] == start.tolist()
    if step == 1:
        np.testing.assert_array_equal(kept, np.minimum(lengths, max_behaviors))


@pytest.mark.parametrize("max_behaviors, step", [(0, 1), (4, 0), (4, 5)])
def test_window_start_refuses_a_bad_rule(max_behaviors, step):
    with pytest.raises(ValueError, match="max_behaviors"):
        window_start(10, max_behaviors, step)


def test_the_step_defaults_to_a_quarter_of_m_and_old_scorers_read_the_last_m():
    assert [ModelConfig(max_behaviors=m).history_step for m in (1, 3, 4, 20, 1024)] == [1, 1, 1, 5, 256]
    assert ModelConfig(max_behaviors=20, window_step=3).history_step == 3
    with pytest.raises(ValueError, match="window_step"):
        ModelConfig(max_behaviors=20, window_step=21)
    model = ScorerConfig(model=ModelConfig(max_behaviors=20)).to_dict()
    model["model"].pop("window_step")
    assert ScorerConfig.from_dict(model, format_version=4).model.history_step == 1
    assert ScorerConfig.from_dict(model).model.history_step == 5


def test_counts_read_the_whole_history_and_the_layers_its_window(tiny_checkpoints, tmp_path):
    """Two users with the same window (the last 4) and the same history counts, but different likes among their
    last 8 events: the recent-event features, read from the whole history as in training, tell them apart."""
    names = ("liked", "watched")
    texts = [f"movie {i}" for i in range(12)]
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=names, max_behaviors=4, window_step=1, recent_events=8))
    torch.manual_seed(0)
    scorer = BAHEScorer.create(tiny_checkpoints["bert"], behavior_texts=texts, item_texts=texts,
                               tables_dir=tmp_path / "tables", config=config, device="cpu", progress=False)
    with torch.no_grad():
        for p in scorer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    watched = texts[:10]
    liked_old = {"liked": watched[4:6] + watched[6:10], "watched": watched}   # 6 of the last 8 liked
    liked_new = {"liked": watched[0:2] + watched[6:10], "watched": watched}   # 4 of the last 8 liked
    counts = [{"liked": 6, "watched": 10}] * 2
    a, b = scorer.score([liked_old, liked_new], ["movie 11"] * 2, history_counts=counts)
    window = [{name: seq[-4:] for name, seq in user.items()} for user in (liked_old, liked_new)]
    assert window[0] == window[1] and abs(a - b) > 1e-6


def test_a_non_text_before_the_window_is_named(tiny_checkpoints, tmp_path):
    from engine.serving.inputs import InputError
    config = ScorerConfig(encoder=EncoderConfig(num_lower_layers=2),
                          model=ModelConfig(sequence_names=("click",), max_behaviors=2, window_step=1))
    scorer = BAHEScorer.create(tiny_checkpoints["bert"], behavior_texts=["a", "b"], item_texts=["a"],
                               tables_dir=tmp_path / "tables", config=config, device="cpu", progress=False)
    users = [{"click": ["a"]}, {"click": ["b", 7, "a", "b"]}]
    with pytest.raises(InputError, match=r"users\[1\]\['click'\] behavior 1 \(before the window"):
        scorer.score(users, ["a", "a"])
