"""FactorizedLatentCodec: strings that decode to exactly what the encoder predicted, at the model's rate."""

import pytest
import torch

from diffarc.codecs.errors import EntropyCodingError
from diffarc.codecs.parts.entropy import LogisticMixtureDensity, ideal_bits, symbol_tables
from diffarc.codecs.parts.latent_codecs import FactorizedLatentCodec, LatentCodec


@pytest.fixture
def density():
    torch.manual_seed(0)
    return LogisticMixtureDensity(channels=3, mixtures=2)


def latents(seed=0):
    """Two images' latents of 3 channels, with different offsets and spreads per channel and per image."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(2, 3, 5, 7, generator=generator)
    return y * torch.tensor([1.0, 3.0, 0.3]).view(1, 3, 1, 1) + torch.tensor([[0.5], [-4.0]]).view(2, 1, 1, 1)


def test_compress_then_decompress_gives_the_encoders_reconstruction(density):
    codec = FactorizedLatentCodec(density, step=0.5)
    y = latents()
    means, scales = torch.tensor([[0.1, -0.2, 0.0], [0.0, 0.3, 0.2]])[..., None, None], torch.full((2, 3, 1, 1), 1.5)
    coded = codec.compress(y, means, scales)
    assert isinstance(codec, LatentCodec) and coded["shape"] == (5, 7)
    ranges, words = coded["strings"]
    assert len(ranges) == len(words) == 2 and all(len(r) == 4 for r in ranges)
    assert ranges[0] != ranges[1]  # each image codes its own symbol range
    y_hat = codec.decompress(coded["strings"], coded["shape"], means, scales)["y_hat"]
    assert torch.equal(y_hat, coded["y_hat"])
    assert (y_hat - y).abs().max() <= 0.5 * 0.5 * 1.5 + 1e-6  # within half a quantization step (Δ·scale)


def test_the_words_cost_what_the_tables_say(density):
    codec = FactorizedLatentCodec(density, step=0.25)
    y = latents(1)[:1]
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    (ranges,), (words,) = codec.compress(y, zero, one)["strings"]
    lo, hi = FactorizedLatentCodec.RANGE.unpack(ranges)
    symbols = torch.round(y[0] / 0.25).flatten(1).long().numpy()
    ideal = ideal_bits(symbol_tables(density, 0.25, lo, hi), symbols, lo)
    assert (symbols.min(), symbols.max()) == (lo, hi)
    assert ideal <= 8 * len(words) <= ideal + 64


def test_a_coarser_step_costs_fewer_bytes(density):
    y, zero, one = latents(2), torch.zeros(2, 3, 1, 1), torch.ones(2, 3, 1, 1)
    sizes = [sum(map(len, FactorizedLatentCodec(density, step).compress(y, zero, one)["strings"][1])) for step in (0.1, 0.5, 2)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_damaged_strings_are_entropy_coding_errors(density):
    codec = FactorizedLatentCodec(density, step=0.5)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    (ranges,), (words,) = codec.compress(latents()[:1], zero, one)["strings"]
    for bad in ([[FactorizedLatentCodec.RANGE.pack(3, 2)], [words]], [[ranges[:3]], [words]], [[ranges], [words[:-1]]]):
        with pytest.raises(EntropyCodingError):
            codec.decompress(bad, (5, 7), zero, one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare with the CPU")
def test_a_density_on_the_gpu_codes_the_same_bytes_as_on_the_cpu(density):
    """The tables are built in float64 on the CPU from the float32 parameters, wherever the density lives."""
    y, zero, one = latents(), torch.zeros(2, 3, 1, 1), torch.ones(2, 3, 1, 1)
    on_cpu = FactorizedLatentCodec(density, 0.5).compress(y, zero, one)
    on_gpu = FactorizedLatentCodec(density.to("cuda"), 0.5).compress(y.cuda(), zero.cuda(), one.cuda())
    assert on_gpu["strings"] == on_cpu["strings"]
