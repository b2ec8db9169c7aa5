"""The Python API refuses what it cannot score, naming the argument: texts with no visible content, a bare
str where a list of texts is due, score_ids tensors without values (sparse, meta)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import BAHEScorer, InputError
from engine.encoding.abe import ReusingEncoder
from tests.serving.test_scorer import BEHAVIORS, make_scorer

# Characters that show nothing: controls, zero-width and format characters, BOM, variation selectors, tags.
INVISIBLE = ["\x00", "\x01", "\x1f", "\x7f", "\x85", "\u00ad", "\u034f", "\u180e", "\u200b", "\u200c", "\u200d",
             "\u200e", "\u2060", "\u2062", "\u206f", "\ufeff", "\ufe0f", "\u3164", "\U000e0041", "\U000e007f"]
invisible_texts = st.text(alphabet=st.sampled_from(INVISIBLE + [" ", "\t", "\n"]), min_size=1, max_size=8).filter(
    lambda t: t.strip())  # whitespace-only texts have their own message
NOTHING = r"(has no visible content|whitespace-only)"


@pytest.fixture(scope="module", params=["bert", "llama"])
def scorer(request, tiny_checkpoints, tmp_path_factory):
    """BERT's tokenizer gives [CLS] [SEP] for any text: before, '\\x00' was encoded as a row of its own."""
    return make_scorer(tiny_checkpoints[request.param], tmp_path_factory.mktemp(request.param))


# ----- texts with no visible content ------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(text=invisible_texts, position=st.integers(0, 3))
def test_texts_with_no_visible_content_are_input_errors(scorer, text, position):
    behaviors = [BEHAVIORS[0], BEHAVIORS[1], BEHAVIORS[2]]
    behaviors.insert(position, text)
    with pytest.raises(InputError, match=rf"users\[1\]\['buy'\] behavior {position} .*{NOTHING}"):
        scorer.score([{}, {"buy": behaviors}], ["coffee", "coffee"])
    with pytest.raises(InputError, match=rf"items\[1\]: .*{NOTHING}"):
        scorer.score([{}, {}], ["coffee", text])
    with pytest.raises(InputError, match=rf"texts\[1\]: .*{NOTHING}|no tokens"):
        scorer.encoder.encode(["coffee", text])


def test_texts_with_no_visible_content_are_never_appended(tiny_checkpoints, tmp_path):
    scorer = make_scorer(tiny_checkpoints["bert"], tmp_path, append_unknown=True)
    before = len(scorer.behaviors)
    for text in ["\x00", "\u200b\u200d", "\ufeff", "\ufe0f\U000e0041"]:
        with pytest.raises(InputError, match=r"users\[0\]\['click'\] behavior 1 .*no visible content"):
            scorer.score([{"click": ["a fresh one", text]}], ["coffee"])
    assert len(scorer.behaviors) == before


def test_visible_texts_with_invisible_characters_still_score(scorer):
    got = scorer.score([{"click": ["\u200bbought\x00 latte\ufeff"]}], ["\u2060coffee"])
    assert got.shape == (1,) and np.isfinite(got).all()


# ----- a bare str where a list of texts is due -------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(text=st.text(min_size=1, max_size=20))
def test_a_bare_str_is_never_read_as_its_characters(scorer, text):
    with pytest.raises(InputError, match=r"users\[0\]\['click'\] must be a list of behavior texts, got str"):
        scorer.score([{"click": text}], ["coffee"])
    with pytest.raises(InputError, match="items must be a list of item texts, got str"):
        scorer.score([{}], text)
    with pytest.raises(InputError, match="users must be a list of dicts, got str"):
        scorer.score(text, ["coffee"])
    for call in (scorer.encoder.encode, scorer.encoder.tokenize, ReusingEncoder(scorer.encoder, scorer.behaviors).encode):
        with pytest.raises(TypeError, match="texts must be a list of texts, got a bare str"):
            call(text)
    with pytest.raises(TypeError, match="texts must be a list of texts, got a bare bytes"):
        scorer.encoder.encode(text.encode())


@pytest.mark.parametrize("argument", ["behavior_texts", "item_texts"])
def test_create_refuses_a_bare_str(tiny_checkpoints, tmp_path, argument):
    texts = {"behavior_texts": BEHAVIORS, "item_texts": ["coffee"], argument: "hello"}
    with pytest.raises(TypeError, match=rf"{argument} must be a list of texts, got a bare str 'hello'; wrap it"):
        BAHEScorer.create(tiny_checkpoints["llama"], tables_dir=tmp_path, device="cpu", progress=False, **texts)
    assert not any(tmp_path.iterdir())


# ----- score_ids tensors without values ---------------------------------------------------------
def _sparse(t):
    return t.to_sparse()


def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize("make,match", [(_sparse, "must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
                                        (_meta, "is on the meta device: it holds no values")])
@pytest.mark.parametrize("argument", ["behavior_rows", "offsets", "item_rows"])
def test_score_ids_refuses_tensors_without_values(scorer, make, match, argument):
    good = {"behavior_rows": torch.tensor([0, 1]), "offsets": torch.tensor([0, 2, 2, 2]),
            "item_rows": torch.tensor([0])}
    good[argument] = make(good[argument])
    with pytest.raises(TypeError, match=rf"{argument} {match}"):
        scorer.score_ids(**good)
