"""engine/training/streaming/membership_bits.py: the streamed shards' sequence bit masks."""
import numpy as np
import pytest

from engine.training.streaming.membership_bits import MAX_SEQUENCES, pack_membership, unpack_membership


@pytest.mark.parametrize("seed", range(4))
def test_pack_then_unpack_gives_the_columns_back_at_their_bits(seed):
    rng = np.random.default_rng(seed)
    n, sequences = int(rng.integers(0, 50)), int(rng.integers(1, MAX_SEQUENCES + 1))
    bits = rng.permutation(sequences)[:int(rng.integers(1, sequences + 1))].tolist()
    member = rng.random((n, len(bits))) < 0.5
    mask = pack_membership(member, bits)
    assert mask.dtype == np.int64 and mask.shape == (n,) and (mask >= 0).all()
    unpacked = unpack_membership(mask, sequences)
    expected = np.zeros((n, sequences), bool)
    expected[:, bits] = member
    np.testing.assert_array_equal(unpacked, expected)


@pytest.mark.parametrize("bits,shape,message", [
    ([MAX_SEQUENCES], (2, 1), r"bits must be in \[0, 63\), got \[63\]"),
    ([-1], (2, 1), r"got \[-1\]"),
    ([0, 1], (2, 1), r"need \(N, 2\) membership columns for 2 bits, got shape \(2, 1\)"),
])
def test_bad_bits_or_columns_are_refused(bits, shape, message):
    with pytest.raises(ValueError, match=message):
        pack_membership(np.ones(shape, bool), bits)
