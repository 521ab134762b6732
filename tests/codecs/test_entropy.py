"""The learned entropy model and the range coder: exact round trips, and code lengths as the model says."""

import numpy as np
import pytest
import torch

from diffarc.codecs.parts.entropy import (
    EntropyCodingError, LogisticMixtureDensity, decode_symbols, encode_symbols, ideal_bits, least_bits, symbol_range,
    symbol_tables,
)  # fmt: skip


@pytest.fixture
def density():
    torch.manual_seed(0)
    model = LogisticMixtureDensity(channels=3, mixtures=4)
    with torch.no_grad():  # channels of different widths and offsets, as a trained model has
        model.log_scales += torch.tensor([[-1.0], [0.0], [1.0]])
        model.means += torch.tensor([[0.0], [0.5], [-1.0]])
    return model


def test_symbols_round_trip_and_cost_what_the_model_says(density):
    rng = np.random.default_rng(0)
    symbols = np.stack([np.round(rng.logistic(0, s, 5000) / 0.7) for s in (0.3, 1.0, 3.0)]).astype(np.int64)
    lo, hi = symbol_range(symbols)
    tables = symbol_tables(density, 0.7, lo, hi)
    assert tables.shape == (3, hi - lo + 1) and np.allclose(tables.sum(1), 1)
    data = encode_symbols(symbols, tables, lo)
    assert np.array_equal(decode_symbols(data, tables, lo, symbols.shape[1]), symbols)
    ideal = ideal_bits(tables, symbols, lo)
    assert ideal <= 8 * len(data) <= ideal * 1.01 + 64  # a range coder is within a few words of the ideal


def test_training_bits_match_the_tables(density):
    """The differentiable rate (bin probability of y) equals −log2 of the coder's table for that symbol."""
    step = 0.5
    y = (torch.arange(-8, 9) * step).view(1, 1, 1, -1).repeat(1, 3, 1, 1)  # the bin centres
    with torch.no_grad():
        bits = density.bits(y, torch.tensor([step]))[0, :, 0].double().numpy()
    symbols = np.round(y[0, :, 0].numpy() / step).astype(np.int64)
    tables = symbol_tables(density, step, -400, 400)
    expected = -np.log2(np.take_along_axis(tables, symbols + 400, axis=1))
    # The tables are renormalised over −400 … 400 and floored; the central symbols agree to float rounding.
    assert np.allclose(bits, expected, atol=1e-3)


def test_damaged_data_and_out_of_range_symbols_are_errors(density):
    tables = symbol_tables(density, 1.0, -2, 2)
    with pytest.raises(EntropyCodingError, match="32-bit words"):
        decode_symbols(b"abc", tables, -2, 10)
    with pytest.raises(EntropyCodingError, match="step is far too small"):
        symbol_range(np.array([[0, 1 << 20]]))


def test_words_the_range_coder_asserts_on_are_an_entropy_coding_error():
    # constriction answers data its model cannot have written with an AssertionError (found by the fuzzer).
    tables = np.array([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
    words = np.array([2125653448, 1244858259, 1086767971, 3497882818], dtype="<u4").tobytes()
    with pytest.raises(EntropyCodingError, match="does not decode: Tried to decode from compressed data that is invalid"):
        decode_symbols(words, tables, 0, 20)


def test_more_symbols_than_the_words_can_hold_are_refused_before_decoding(density):
    rng = np.random.default_rng(1)
    symbols = np.stack([np.round(rng.logistic(0, s, 2000) / 0.7) for s in (0.3, 1.0, 3.0)]).astype(np.int64)
    lo, hi = symbol_range(symbols)
    tables = symbol_tables(density, 0.7, lo, hi)
    data = encode_symbols(symbols, tables, lo)
    # The bound is below what real data costs (so no honest stream is refused) ...
    assert least_bits(tables, symbols.shape[1]) < 8 * len(data)
    assert np.array_equal(decode_symbols(data, tables, lo, symbols.shape[1]), symbols)
    # ... and refuses a count its words cannot hold, where decoding would allocate them all.
    with pytest.raises(EntropyCodingError, match=r"\d+ words cannot hold 3×10000000 symbols"):
        decode_symbols(data, tables, lo, 10_000_000)
