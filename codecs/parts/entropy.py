"""A learned entropy model for quantized latents, and real arithmetic coding with it (constriction).

    y (one channel of a transformed latent) ──round(y / Δ)──► symbols q
    density p_c(y): a mixture of logistics per channel, trained by `diffarc train latent-denoise`
    P(q) = CDF_c((q + ½)Δ) − CDF_c((q − ½)Δ), renormalised over the stream's symbol range [lo, hi]
    symbols ──range coder (constriction), one categorical table per channel──► 32-bit words

The density is of the continuous y, not of the symbols, so one trained model serves every step size Δ
(the rate knob). Training sees y + uniform noise of width Δ, whose density at y is exactly P(q) above:
the training loss is the real code length up to the coder's overhead of a few bytes per stream.

Encoder and decoder must build identical tables. They are computed on the CPU in float64 from the
stored float32 parameters, with the same numpy code on both sides, whatever device ran the networks.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EntropyCodingError

MAX_SYMBOL = 1 << 15  # symbols are stored as int16 bounds; a wider range means a step far too small


class LogisticMixtureDensity(torch.nn.Module):
    """p_c(y) = Σ_k w_ck · logistic(y; μ_ck, s_ck), per channel c: monotone CDF by construction."""

    def __init__(self, channels: int, mixtures: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(channels, mixtures))
        # Spread the components so that they start out covering both tails.
        self.means = torch.nn.Parameter(torch.linspace(-2, 2, mixtures).repeat(channels, 1))
        self.log_scales = torch.nn.Parameter(torch.zeros(channels, mixtures))

    def cdf(self, y: torch.Tensor) -> torch.Tensor:
        """CDF of (B, C, H, W) values, channel by channel."""
        w = self.logits.softmax(-1)[None, :, None, None, :]
        z = (y.unsqueeze(-1) - self.means[None, :, None, None, :]) * torch.exp(-self.log_scales)[None, :, None, None, :]
        return (w * torch.sigmoid(z)).sum(-1)

    def bits(self, y: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Code length in bits of each value of y quantized with step Δ (a (B,) tensor); y may carry noise."""
        half = (step / 2).view(-1, 1, 1, 1)
        probability = self.cdf(y + half) - self.cdf(y - half)
        return -torch.log2(probability.clamp_min(1e-9))


def symbol_tables(density: LogisticMixtureDensity, step: float, lo: int, hi: int) -> np.ndarray:
    """(C, hi − lo + 1) probabilities of the symbols lo … hi, each row summing to 1, in float64 on the CPU."""
    w = density.logits.detach().to("cpu", torch.float64).numpy()
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    means = density.means.detach().to("cpu", torch.float64).numpy()
    inv_scales = np.exp(-density.log_scales.detach().to("cpu", torch.float64).numpy())
    edges = (np.arange(lo, hi + 2, dtype=np.float64) - 0.5) * step  # hi − lo + 2 bin edges
    z = (edges[None, :, None] - means[:, None, :]) * inv_scales[:, None, :]
    with np.errstate(over="ignore"):  # far tails: exp overflows to inf and the logistic is exactly 0, as wanted
        cdf = (w[:, None, :] / (1 + np.exp(-z))).sum(-1)
    probabilities = np.diff(cdf, axis=1).clip(min=0.0)
    # A floor keeps every symbol codable (far tails underflow), then the rows are renormalised.
    probabilities += 1e-12
    return probabilities / probabilities.sum(1, keepdims=True)


def encode_symbols(symbols, tables: np.ndarray, lo: int) -> bytes:
    """Range-code rows of integer symbols ((C, N), or C rows of any lengths), row c with table c; the words
    as little-endian bytes."""
    import constriction

    encoder = constriction.stream.queue.RangeEncoder()
    for channel, table in zip(symbols, tables):
        model = constriction.stream.model.Categorical(table, perfect=False)
        encoder.encode(np.ascontiguousarray(channel - lo, dtype=np.int32), model)
    return encoder.get_compressed().astype("<u4").tobytes()


def decode_symbols(data: bytes, tables: np.ndarray, lo: int, count: int) -> np.ndarray:
    """The (C, count) symbols `encode_symbols` coded; a damaged stream raises EntropyCodingError."""
    return np.stack(decode_symbol_rows(data, tables, lo, [count] * len(tables)))


def decode_symbol_rows(data: bytes, tables: np.ndarray, lo: int, counts: list[int]) -> list[np.ndarray]:
    """Rows of counts[c] symbols each, row c coded with table c; a damaged stream raises EntropyCodingError."""
    import constriction

    if len(data) % 4:
        raise EntropyCodingError(f"entropy-coded data is {len(data)} bytes, not a whole number of 32-bit words")
    least = least_bits(tables, counts)
    if least > 2 * 8 * len(data) + 64:  # twice the words and two more: room for the coder's rounding
        shape = f"{len(counts)}×{counts[0]}" if len(set(counts)) == 1 else str(sum(counts))
        raise EntropyCodingError(f"{len(data) // 4} words cannot hold {shape} symbols, which need at least {least:.0f} bits")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    try:
        return [
            decoder.decode(constriction.stream.model.Categorical(table, perfect=False), count).astype(np.int64) + lo
            for table, count in zip(tables, counts, strict=True)
        ]
    except (ValueError, RuntimeError, AssertionError) as exc:  # constriction asserts on data its model cannot have written
        raise EntropyCodingError(f"entropy-coded data does not decode: {exc}") from None


def least_bits(tables: np.ndarray, counts: int | list[int]) -> float:
    """A lower bound on the coded size of `counts` symbols per table row (one count for every row, or one
    each), whatever they are: each costs at
    least the information of its row's likeliest symbol, taken as likely as the coder's 24-bit quantization
    could make it. What lets a decoder refuse a stream claiming more symbols than its words can hold
    before allocating them (a row of one symbol costs nothing: any count fits)."""
    size = tables.shape[1]
    likeliest = np.minimum(tables.max(axis=1) + size * 2.0**-24, 1.0 - (size - 1) * 2.0**-24)
    return float((np.asarray(counts, dtype=np.float64) * -np.log2(likeliest)).sum())


def ideal_bits(tables: np.ndarray, symbols: np.ndarray, lo: int) -> float:
    """The information content of the symbols under the tables: what the coder should come close to."""
    picked = np.take_along_axis(tables, symbols - lo, axis=1)
    return float(-np.log2(picked).sum())


def symbol_range(symbols: np.ndarray) -> tuple[int, int]:
    """[lo, hi] of the symbols, at least two wide: constriction refuses a one-symbol table (a constant latent)."""
    lo, hi = int(symbols.min()), int(symbols.max())
    hi = max(hi, lo + 1)
    if lo < -MAX_SYMBOL or hi >= MAX_SYMBOL:
        raise EntropyCodingError(
            f"quantized latent spans {lo} … {hi}, beyond ±{MAX_SYMBOL}: the quantization step is far too small"
        )
    return lo, hi
