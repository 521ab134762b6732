"""The hyperprior codec and its latent codec, on tiny models saved by the test (the shipped model where named)."""

import numpy as np
import pytest
import torch

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError, EntropyCodingError, ModelError
from diffarc.codecs.hyperprior.codec import SIDE, HyperpriorCodec
from diffarc.codecs.hyperprior.nets import HYPER_STRIDE, HyperpriorModel
from diffarc.codecs.parts.latent_codecs import (
    SCALE_LEVELS, LatentCodec, MeanScaleHyperpriorLatentCodec, gaussian_bits, gaussian_tables, mean_and_scale,
    scale_indexes,
)
from diffarc.codecs.registry import codec_for_header, create_codec

from ..conftest import KODAK, decode_in_new_process, photo_like

IMAGES = [photo_like(40, 56, 1), photo_like(1, 1, 2), photo_like(1, 300, 3), photo_like(130, 70, 4)]


def tiny_model(seed=0) -> HyperpriorModel:
    """An untrained tiny model, its y scaled up to a trained model's magnitude (a few units, not hundredths)."""
    torch.manual_seed(seed)
    model = HyperpriorModel(channels=8, latent_channels=8, hyper_channels=8, mixtures=2).eval().requires_grad_(False)
    model.analysis[-1].weight.mul_(30)
    model.synthesis[0].weight.div_(30)
    return model


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hyperprior")
    tiny_model().save_pretrained(folder)
    return str(folder)


SCALE_BIASES = torch.linspace(0.5, 4.0, 8)  # σ per channel ≈ softplus(bias): 1.0 … 4.0


def latent_codec_for_wide_latents():
    """A tiny model whose hyper-decoder predicts scales near those of `wide_latents`, one per channel and
    varying a little by position, so that many scale levels are in use; an untrained one predicts σ ≈ 0.7
    everywhere."""
    model = tiny_model()
    last = model.hyper_synthesis[-1]
    last.weight.mul_(0.3)
    last.bias[8:] = SCALE_BIASES
    return MeanScaleHyperpriorLatentCodec(model.hyper_analysis, model.hyper_synthesis, model.z_density, HYPER_STRIDE)


def wide_latents(seed=0):
    """Two images' y of 8 channels, each channel Gaussian with the scale the model above predicts for it,
    of a size that is not a multiple of the hyper-stride."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.nn.functional.softplus(SCALE_BIASES).view(1, 8, 1, 1)
    return scales * torch.randn(2, 8, 22, 37, generator=generator)


def test_compress_then_decompress_gives_the_encoders_reconstruction():
    codec = latent_codec_for_wide_latents()
    y = wide_latents()
    coded = codec.compress(y, step=0.5)
    assert isinstance(codec, LatentCodec) and coded["shape"] == (22, 37)
    assert [len(part) for part in coded["strings"]] == [2, 2, 2, 2]  # y's range, y's words, z's range, z's words
    y_hat = codec.decompress(coded["strings"], coded["shape"], step=0.5)["y_hat"]
    assert torch.equal(y_hat, coded["y_hat"])
    assert (y_hat - y).abs().max() <= 0.25 + 1e-5  # within half a step Δ


def test_the_words_cost_within_1_percent_of_the_ideal_code_length():
    codec, step = latent_codec_for_wide_latents(), 0.5
    y = wide_latents(1)[:1]
    y_ranges, y_words, z_ranges, z_words = codec.compress(y, step=step)["strings"]
    (ideal,) = codec.ideal_bits(y, step)
    scales = mean_and_scale(codec.hyper_decoder(torch.round(codec.hyper_encoder(y[..., :20, :36])).double()))[1]
    assert len(np.unique(scale_indexes(scales.numpy() / step))) >= 8  # the symbols are spread over many tables
    assert ideal > 10_000  # enough bits for 1 % to exceed the coder's few words of flush
    assert 0.99 * ideal <= 8 * (len(y_words[0]) + len(z_words[0])) <= 1.01 * ideal


def test_the_tables_hold_the_gaussian_that_training_rates_with():
    """gaussian_tables (float64 numpy, what the coder uses) against gaussian_bits (torch, what training
    minimises), renormalised over the table's symbol range as the tables are."""
    levels = np.array([0, 10, 30, 63])
    tables = gaussian_tables(levels, -60, 40)
    q = torch.arange(-60, 41, dtype=torch.float64)
    expected = (2.0 ** -gaussian_bits(q[None, :], torch.from_numpy(SCALE_LEVELS[levels])[:, None])).numpy()
    expected /= expected.sum(1, keepdims=True)
    codable = expected > 1e-8  # below, training's floor of 1e-9 and the tables' of 1e-12 differ
    assert np.allclose(tables[codable], expected[codable], rtol=1e-5)
    assert np.allclose(tables.sum(1), 1.0)


def test_scale_levels_are_picked_to_the_nearest_level():
    assert list(scale_indexes(np.array([0.0, 0.05, SCALE_LEVELS[0], SCALE_LEVELS[5] * 1.02, SCALE_LEVELS[5] * 0.98, 1e9]))) == [
        0, 0, 0, 5, 5, len(SCALE_LEVELS) - 1,
    ]  # fmt: skip


def test_damaged_latent_strings_are_entropy_coding_errors():
    codec = latent_codec_for_wide_latents()
    y_ranges, y_words, z_ranges, z_words = codec.compress(wide_latents()[:1], step=0.5)["strings"]
    for bad in (
        [[y_ranges[0][:3]], y_words, z_ranges, z_words],
        [[MeanScaleHyperpriorLatentCodec.RANGE.pack(3, 2)], y_words, z_ranges, z_words],
        [y_ranges, [y_words[0][:-1]], z_ranges, z_words],
        [y_ranges, y_words, z_ranges, [z_words[0][:-2]]],
    ):
        with pytest.raises(EntropyCodingError):
            codec.decompress(bad, (22, 37), step=0.5)


def test_any_size_round_trips_and_the_encoder_knows_the_decoded_picture(model_folder):
    codec = create_codec("hyperprior", {"model": model_folder, "step": 0.5})
    streams = codec.encode(IMAGES)
    decoded = codec.decode(streams)
    assert [d.shape for d in decoded] == [i.shape for i in IMAGES]
    for image, stream, picture in zip(IMAGES, streams, decoded):
        payload, predicted = codec.encode_picture(image, 0.5)
        assert payload == container.unpack(stream)[1] and np.array_equal(predicted, picture)
        assert np.array_equal(codec.decode_picture(payload, *image.shape[:2], 0.5), picture)


def test_a_coarser_step_costs_fewer_bytes(model_folder):
    image = photo_like(64, 96, 5)
    sizes = [len(create_codec("hyperprior", {"model": model_folder, "step": s}).encode([image])[0]) for s in (0.1, 0.5, 2.0)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_a_fresh_process_decodes_the_picture_the_encoder_predicted(model_folder, tmp_path):
    """What another codec building on this one (HFD) relies on: the base it conditions on at encode time is
    the one every decoder will rebuild."""
    payload, predicted = create_codec("hyperprior", {"model": model_folder}).encode_picture(IMAGES[3], 0.1)
    header = container.Header("hyperprior", {"step": 0.1}, HyperpriorCodec(model=model_folder).fingerprint, width=70, height=130)
    assert np.array_equal(decode_in_new_process(container.pack(header, payload), tmp_path, model_folder), predicted)


def test_streams_need_the_same_weights(model_folder, tmp_path):
    stream = create_codec("hyperprior", {"model": model_folder}).encode([IMAGES[0]])[0]
    tiny_model(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(BitstreamError, match="fingerprint"):
        create_codec("hyperprior", {"model": str(tmp_path / "other")}).decode([stream])
    with pytest.raises(ModelError, match="fingerprint"):
        codec_for_header(container.unpack(stream)[0], model=str(tmp_path / "other"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="train one with `diffarc train hyperprior"):
        create_codec("hyperprior", {"model": str(tmp_path / "empty")})


def test_damaged_payloads_are_bitstream_errors_or_pictures(model_folder):
    """Whatever the damage, the decoder answers with a picture of the stream's size or a BitstreamError."""
    codec = create_codec("hyperprior", {"model": model_folder, "step": 0.1})
    stream = codec.encode([IMAGES[0]])[0]
    header, payload = container.unpack(stream)
    y_range, z_range, z_bytes = SIDE.unpack_from(payload)
    refused = [
        payload[: SIDE.size - 1],
        SIDE.pack(y_range, z_range, len(payload)) + payload[SIDE.size :],  # z longer than the payload
        SIDE.pack(y_range, z_range, z_bytes + 1) + payload[SIDE.size :],  # z's words not whole
        SIDE.pack(b"\x05\x00\x01\x00", z_range, z_bytes) + payload[SIDE.size :],  # empty symbol range
    ]
    for bad in refused:
        with pytest.raises(BitstreamError):
            codec.decode([container.pack(header, bad)])
    rng = np.random.default_rng(0)
    for _ in range(20):
        damaged = bytearray(payload)
        for position in rng.integers(0, len(damaged), size=3):
            damaged[position] ^= 1 << int(rng.integers(8))
        try:
            picture = codec.decode([container.pack(header, bytes(damaged))])[0]
        except BitstreamError:
            continue
        assert picture.shape == IMAGES[0].shape


def test_the_shipped_model_codes_a_photo_at_every_preset():
    image = photo_like(96, 128, 6)
    sizes, errors = [], []
    for preset in HyperpriorCodec.presets:
        codec = create_codec("hyperprior", preset=preset)
        stream = codec.encode([image])[0]
        sizes.append(len(stream))
        errors.append(np.mean((codec.decode([stream])[0].astype(float) - image) ** 2))
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)  # presets listed from the lowest rate
    flat = np.mean((image.mean(axis=(0, 1)) - image.astype(float)) ** 2)  # the image's mean colour everywhere
    assert 10 * np.log10(flat / errors[-1]) > 5  # a trained model: 5 dB better than the flat picture


@pytest.mark.skipif(not KODAK.is_dir(), reason=f"Kodak images not found at {KODAK} (../shared is absent)")
def test_the_shipped_model_codes_kodak_within_1_percent_of_its_ideal_code_length():
    from PIL import Image

    image = np.asarray(Image.open(KODAK / "kodim23.png").convert("RGB"))
    codec = create_codec("hyperprior", {"step": 1.0})
    payload = container.unpack(codec.encode([image])[0])[1]
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        (ideal,) = codec.latent_codec.ideal_bits(codec.model.analysis(x), 1.0)
    # Within 1 % either way: a symbol far in a table's tail costs the coder less than −log2 P (it keeps
    # every probability above 2⁻²⁴), so on a real image the words can come out under the ideal.
    assert 0.99 * ideal <= 8 * (len(payload) - SIDE.size) <= 1.01 * ideal


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare with the CPU")
def test_a_stream_written_on_the_gpu_decodes_on_the_cpu(model_folder):
    """Both sides pick the same tables (the hyper-decoder runs in float64 on the CPU); only g_s's float
    rounding differs between the devices."""
    on_gpu = create_codec("hyperprior", {"model": model_folder, "step": 0.1}, device="cuda")
    on_cpu = create_codec("hyperprior", {"model": model_folder, "step": 0.1})
    for image in IMAGES:
        payload, picture = on_gpu.encode_picture(image, 0.1)
        decoded = on_cpu.decode_picture(payload, *image.shape[:2], 0.1)
        assert np.abs(decoded.astype(int) - picture).max() <= 2
