"""Bit writer/reader and combination ranks: exact round trips, and refusals of what does not fit."""

import itertools
import random
from math import comb

import pytest

from diffarc.codecs.parts.bitpack import BitReader, BitWriter, combination_bits, rank_combination, unrank_combination


def test_fields_of_any_width_round_trip_and_pad_to_whole_bytes():
    rng = random.Random(0)
    fields = [(rng.getrandbits(bits), bits) for bits in (rng.randint(1, 40) for _ in range(300))]
    writer = BitWriter()
    for number, bits in fields:
        writer.write(number, bits)
    total = sum(bits for _, bits in fields)
    data = writer.getvalue()
    assert len(data) == -(-total // 8)
    reader = BitReader(data, total)
    assert [reader.read(bits) for _, bits in fields] == [number for number, _ in fields]


def test_the_layout_is_most_significant_bit_first():
    writer = BitWriter()
    writer.write(0b101, 3)
    writer.write(1, 1)
    assert writer.getvalue() == bytes([0b1011_0000])


def test_a_number_too_wide_for_its_field_and_a_payload_too_short_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        BitWriter().write(8, 3)
    with pytest.raises(ValueError, match="does not fit"):
        BitWriter().write(-1, 3)
    with pytest.raises(ValueError, match="needs 17"):
        BitReader(b"\x00\x00", 17)


@pytest.mark.parametrize("n, k", [(1, 1), (5, 2), (8, 3), (10, 10), (16, 4)])
def test_combination_ranks_are_a_bijection_onto_0_to_c_n_k(n, k):
    ranks = [rank_combination(list(chosen)) for chosen in itertools.combinations(range(n), k)]
    assert sorted(ranks) == list(range(comb(n, k)))
    for rank in ranks[:50]:
        chosen = unrank_combination(rank, n, k)
        assert len(set(chosen)) == k and all(0 <= c < n for c in chosen)
        assert rank_combination(chosen) == rank
    assert (comb(n, k) - 1).bit_length() <= combination_bits(n, k)


def test_large_codebooks_round_trip_in_the_bits_combination_bits_gives():
    rng = random.Random(1)
    for _ in range(100):
        chosen = rng.sample(range(1 << 16), 8)
        rank = rank_combination(chosen)
        assert rank < 1 << combination_bits(1 << 16, 8)
        assert unrank_combination(rank, 1 << 16, 8) == sorted(chosen)  # order does not matter: sets are ranked


def test_a_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        unrank_combination(comb(10, 3), 10, 3)
