"""glc: the codec on taef2 with tiny transforms saved by the test (the shipped ones where named), and its training."""

import copy
import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError, ModelError
from diffarc.codecs.glc.codec import IMAGE_STRIDE
from diffarc.codecs.glc.nets import GlcModel
from diffarc.codecs.glc.task import MODEL_CONFIGS
from diffarc.codecs.parts import crops
from diffarc.codecs.parts.latent_codecs import split_strings
from diffarc.codecs.parts.latents import decode_latents, padded_size, tensor_to_images
from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.parts.models import BUILTIN_DIR, load_model
from diffarc.codecs.registry import codec_for_header, create_codec, open_codec, read_header, training_task
from diffarc.codecs.task import TrainSettings

from ..conftest import KODAK, photo_like

SHIPPED = BUILTIN_DIR / "taef2" / "glc" / "config.json"


def save_tiny_transforms(folder, seed=0):
    """Untrained tiny transforms, y scaled up to a trained model's magnitude so that symbols are not all 0."""
    torch.manual_seed(seed)
    model = GlcModel(**MODEL_CONFIGS["tiny"]).eval().requires_grad_(False)
    model.analysis.tail.weight.mul_(30)
    model.synthesis.head.weight.div_(30)
    model.save_pretrained(str(folder))
    return str(folder)


def model_folder(folder, transforms):
    """A folder laid out as --model expects (vae/ and glc/), which a stream's decoder is pointed at."""
    folder.mkdir()
    (folder / "vae").symlink_to(BUILTIN_DIR / "taef2" / "vae")
    (folder / "glc").symlink_to(transforms)
    return str(folder)


@pytest.fixture(scope="module")
def transforms(tmp_path_factory):
    return save_tiny_transforms(tmp_path_factory.mktemp("glc"))


@pytest.fixture(scope="module")
def codec(transforms):
    return create_codec("glc", {"transforms": transforms, "step": 1.0})


@pytest.mark.parametrize("size", [(1, 1), (40, 56), (17, 300)])
def test_any_size_decodes_to_its_own_size_the_same_each_time(codec, size):
    image = photo_like(*size, seed=size[1])
    (stream,) = codec.encode([image])
    first = codec.decode([stream])[0]
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(codec.decode([stream])[0], first)


@pytest.mark.slow
def test_a_one_by_four_thousand_strip_decodes(codec):
    image = photo_like(1, 4000, 3)
    assert codec.decode(codec.encode([image]))[0].shape == (1, 4000, 3)


def test_a_stream_names_its_step_not_where_its_weights_are(codec):
    header = container.unpack(codec.encode([photo_like(16, 16, 0)])[0])[0]
    assert header.params == {"step": 1.0} and header.fingerprint == codec.fingerprint


def test_a_coarser_step_costs_fewer_bytes(transforms):
    image = photo_like(64, 96, 5)
    sizes = [len(create_codec("glc", {"transforms": transforms, "step": s}).encode([image])[0]) for s in (0.5, 4.0)]
    assert sizes[1] < sizes[0]


def test_other_transforms_are_refused(codec, transforms, tmp_path):
    (stream,) = codec.encode([photo_like(24, 24, 1)])
    other = create_codec("glc", {"transforms": save_tiny_transforms(tmp_path / "other", seed=1), "step": 1.0})
    assert other.fingerprint != codec.fingerprint
    with pytest.raises(BitstreamError, match="fingerprint"):
        other.decode([stream])
    header = container.unpack(stream)[0]
    with pytest.raises(ModelError, match="no model weights with fingerprint"):
        open_codec("glc", header.params, header.fingerprint, model=model_folder(tmp_path / "a", tmp_path / "other"))
    assert open_codec("glc", header.params, header.fingerprint, model=model_folder(tmp_path / "b", transforms)).fingerprint == codec.fingerprint


def test_a_damaged_payload_is_refused_before_decoding(codec):
    header, payload = container.unpack(codec.encode([photo_like(32, 32, 2)])[0])
    for damaged in (payload[:5], payload[:8] + b"\xff\xff\x00\x00" + payload[12:], payload[: len(payload) // 2]):
        with pytest.raises(BitstreamError):
            codec.decode([container.pack(header, damaged)])


THREADS_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from diffarc.codecs.registry import codec_for_header, read_header
for path in sys.argv[3:]:
    stream = open(path, "rb").read()
    codec = codec_for_header(read_header(stream), model=sys.argv[2])
    print(hashlib.sha256(codec.decode([stream])[0].tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_a_fresh_process_decodes_the_same_pixels_with_one_and_with_two_threads(codec, transforms, tmp_path):
    """Small pictures decode on one thread; one of 256 × 320 (1280 latent px) on torch's threads."""
    paths = []
    for index, size in enumerate([(1, 1), (30, 50), (256, 320)]):
        paths.append(tmp_path / f"{index}.glc")
        paths[-1].write_bytes(codec.encode([photo_like(*size, seed=index)])[0])
    here = [hashlib.sha256(codec.decode([p.read_bytes()])[0].tobytes()).hexdigest() for p in paths]
    folder = model_folder(tmp_path / "model", transforms)  # what a stream does not say: where its weights are
    for threads in (1, 2):
        run = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(threads), folder, *map(str, paths)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert run.stdout.split() == here, f"{threads} threads"


def test_the_latent_codec_gives_the_same_tables_with_one_and_two_threads(codec):
    """The hyper-decoder, float64, on one thread whatever torch's count: μ and σ to the last bit."""
    z_hat = torch.randint(-3, 4, (1, codec.model.config.hyper_channels, 3, 5)).float()
    torch.set_num_threads(2)
    try:
        two = codec.latent_codec._gaussians(z_hat, (12, 20))
    finally:
        torch.set_num_threads(1)
    one = codec.latent_codec._gaussians(z_hat, (12, 20))
    assert all(np.array_equal(a, b) for a, b in zip(one, two)) and torch.get_num_threads() == 1


# ---------------------------------------------------------------- the shipped transforms


shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="glc's transforms are not shipped in builtin:taef2/glc")

# The shipped transforms' stream of photo_like(32, 48, 0) at preset 0.2bpp, and the SHA-256 of the picture it
# decodes to in float64 (as the taef2 test does: no machine's float32 kernels can move a value across a
# rounding boundary). A wrong weight, layer or table changes it; the float32 decode is within 1 of it.
SHIPPED_STREAM = (
    "444641520103676c63000d7b2273746570223a312e37317d20e5f27428ca75c9b3d161a207fe8c611b5b9a7e8f1339bf5a00741ccdd4eb"
    "18b0000000300000002000000020ffff0100ffff01000c00000080e94a85c925a7b61bfacb433ef8f992404dfca16e549ff1"
)
SHIPPED_PICTURE_SHA256 = "0af376cd686ed280d3e7bda0241b3771a7e2bbe386f86ae2285652e29b6f6365"


def decode_in_float64(stream: bytes, codec=None) -> np.ndarray:
    """The codec's decode (the default transforms' unless `codec` is given), its transforms and taef2 in
    float64 (the range decoder's ŷ is the codec's own)."""
    codec = codec or create_codec("glc")
    header, payload = container.unpack(stream)
    assert header.fingerprint == codec.fingerprint, "a stream of other transforms"
    step = header.params["step"]
    height, width = padded_size(header.height, header.width, IMAGE_STRIDE)
    y_hat = codec.latent_codec.decompress(split_strings(payload), (height // IMAGE_STRIDE, width // IMAGE_STRIDE), step)["y_hat"]
    synthesis = copy.deepcopy(codec.model.synthesis).double()
    with torch.inference_mode():
        z_hat = synthesis(y_hat.double(), torch.full((1,), step, dtype=torch.float64).log())
        pixels = decode_latents(load_model("builtin:taef2", dtype=torch.float64), z_hat)
    return tensor_to_images(pixels, [(header.height, header.width)])[0]


@shipped
def test_the_shipped_transforms_decode_a_stored_stream_to_the_stored_checksum():
    stream = bytes.fromhex(SHIPPED_STREAM)
    picture = decode_in_float64(stream)
    assert hashlib.sha256(picture.tobytes()).hexdigest() == SHIPPED_PICTURE_SHA256
    decoded = create_codec("glc").decode([stream])[0]
    assert np.abs(decoded.astype(int) - picture).max() <= 1


# A stream of the transforms shipped first, replaced since (MODELS.md), made with the code of commit beb7934:
# photo_like(32, 48, 5) at Δ 3.12, and the SHA-256 of the picture it decodes to in float64.
FORMER_STREAM = (
    "444641520103676c63000d7b2273746570223a332e31327d20618cb649ff806419507d53bb73842aca0b88e66fa9d9bf0a0ef9097ee0f6"
    "91fc000000300000002000000020ffff0100ffff01000c00000005c7bd9e5784e8746f26c37d6b99f04aae477e7dbaceeff5"
)
FORMER_PICTURE_SHA256 = "5f282a41579738838c83885fca77a687b6960dd0f4b0478fb4dbf9a6f76f9eb6"


def test_a_stream_of_the_former_transforms_decodes_as_before_without_naming_them():
    stream = bytes.fromhex(FORMER_STREAM)
    decoder = codec_for_header(read_header(stream))  # as `diffarc decode` finds it: from the stream alone
    assert decoder.locations["transforms"] == "builtin:taef2/glc-2026-12-06"
    assert hashlib.sha256(decode_in_float64(stream, decoder).tobytes()).hexdigest() == FORMER_PICTURE_SHA256
    assert np.abs(decoder.decode([stream])[0].astype(int) - decode_in_float64(stream, decoder)).max() <= 1


@shipped
@pytest.mark.slow
@pytest.mark.parametrize("preset, low, high, floor", [("0.02bpp", 0.005, 0.06, 15.0), ("0.2bpp", 0.08, 0.4, 21.0)])
def test_the_shipped_transforms_code_a_kodak_crop_near_their_preset(preset, low, high, floor):
    if not KODAK.is_dir():
        pytest.skip(f"Kodak images not found at {KODAK} (../shared is absent)")
    from PIL import Image

    image = np.asarray(Image.open(KODAK / "kodim23.png").convert("RGB"))[128:384, 256:512]
    codec = create_codec("glc", preset=preset)
    (stream,) = codec.encode([image])
    assert low < 8 * len(stream) / image[..., 0].size < high
    assert psnr(image, codec.decode([stream])[0]) > floor


@shipped
@pytest.mark.parametrize("size", [(1, 1), (1, 2), (1, 3), (1, 4), pytest.param((1, 4000), marks=pytest.mark.slow)])
def test_the_shipped_transforms_decode_any_size(size):
    image = photo_like(*size, seed=size[1])
    codec = create_codec("glc", preset="0.05bpp")
    assert codec.decode(codec.encode([image]))[0].shape == image.shape


@shipped
@pytest.mark.slow
def test_the_shipped_transforms_decode_the_same_pixels_in_fresh_processes_with_one_and_two_threads(tmp_path):
    """A picture above ONE_THREAD_BELOW (256 × 320: 1280 latent px) runs on torch's threads."""
    codec = create_codec("glc", preset="0.1bpp")
    path = tmp_path / "a.glc"
    path.write_bytes(codec.encode([photo_like(256, 320, 4)])[0])
    here = hashlib.sha256(codec.decode([path.read_bytes()])[0].tobytes()).hexdigest()
    for threads in (1, 2):
        run = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(threads), "builtin:taef2", str(path)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert run.stdout.split() == [here], f"{threads} threads"


@shipped
def test_a_stream_of_the_shipped_transforms_is_refused_by_others_and_theirs_by_the_shipped(transforms):
    shipped_codec, other = create_codec("glc", preset="0.2bpp"), create_codec("glc", {"transforms": transforms})
    image = photo_like(16, 24, 6)
    for coder, decoder in ((shipped_codec, other), (other, shipped_codec)):
        with pytest.raises(BitstreamError, match="fingerprint"):
            decoder.decode(coder.encode([image]))


# ---------------------------------------------------------------- training


TRAIN = [photo_like(72, 88, seed) for seed in range(3)]
VALIDATION = [photo_like(64, 64, 9)]


@pytest.mark.parametrize("config", ["tiny", "tiny-pixels"])
def test_one_training_step_on_cached_latents_exports_transforms_the_codec_loads(config, tmp_path, monkeypatch):
    monkeypatch.setenv(crops.LATENT_CACHE_ENV, str(tmp_path / "latents"))
    task_class = training_task("glc")
    settings = TrainSettings(what="glc", data="-", out="-", work_dir="-", batch_size=2, crop=64, config=config)
    task_class.check(settings)
    task = task_class(settings, TRAIN, VALIDATION, torch.device("cpu"))
    torch.manual_seed(0)
    model = task.new_model()
    loss, parts = task.loss(task.wrap(model), np.random.default_rng(0))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.analysis.parameters())
    model.eval()
    with torch.no_grad():
        metrics = {**parts, **task.validate(model)}
    assert [field.format(**metrics) for field in task_class.progress]
    assert metrics["val_bpp_d0p5"] > metrics["val_bpp_d16"]
    taef2 = load_model("builtin:taef2")
    cached = list((tmp_path / "latents" / taef2.autoencoder_fingerprint.hex()).glob("*.safetensors"))
    assert len(cached) == len(TRAIN + VALIDATION)  # each image and its mirror in one file
    model.save_pretrained(str(tmp_path / "trained"))
    task_class.export(settings, tmp_path / "trained", metrics, tmp_path / "out")
    codec = create_codec("glc", {"transforms": str(tmp_path / "out")})
    assert codec.decode(codec.encode([TRAIN[0]]))[0].shape == TRAIN[0].shape
