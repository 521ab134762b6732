"""taef2 (parts/taef2.py) with the shipped weights: what it computes, tiles against the whole, memory, threads."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffarc.codecs.errors import ModelError
from diffarc.codecs.parts import taef2
from diffarc.codecs.parts.latents import images_to_tensor, tensor_to_images
from diffarc.codecs.parts.models import BUILTIN_DIR, load_model

from ..conftest import photo_like

# The shipped weights on a 32 × 48 picture (photo_like(32, 48, 0)), in float64 so that no machine's float32
# kernels can move a value across a rounding boundary: SHA-256 of the latent in 1/256 steps (int32) and of
# the decoded 8-bit picture. Computed once with this module; a wrong key, layer or weight changes them.
# (The closest value to a rounding boundary is 5·10⁻⁴ of a step for the latent, 2·10⁻⁵ for the picture.)
LATENT_SHA256 = "0670f7ec41e4f5fe35bd579983d80b780daa2628b5bf09467de95cef452340f7"
PICTURE_SHA256 = "386591bf9f2886ef4b9f93044cd14be12ab4b2fef892072e6bcbc3835af0aa65"


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def vae():
    return load_model("builtin:taef2").vae


def test_the_shipped_weights_encode_and_decode_a_small_picture_to_the_stored_checksums():
    vae64 = load_model("builtin:taef2", dtype=torch.float64).vae
    image = photo_like(32, 48, 0)
    with torch.inference_mode():
        latent = vae64.encode(images_to_tensor([image], (32, 48), "cpu", torch.float64)).latents
        picture = tensor_to_images(vae64.decode(latent).sample, [(32, 48)])[0]
    assert sha256(np.round(latent.numpy() * 256).astype("<i4")) == LATENT_SHA256
    assert sha256(picture) == PICTURE_SHA256
    # The float32 model the codecs use is the same network: within one level of 255 everywhere.
    with torch.inference_mode():
        vae32 = load_model("builtin:taef2").vae
        picture32 = tensor_to_images(vae32.decode(vae32.encode(images_to_tensor([image], (32, 48), "cpu", torch.float32)).latents).sample, [(32, 48)])[0]
    assert np.abs(picture32.astype(int) - picture).max() <= 1


def test_a_folder_missing_a_half_or_holding_other_weights_is_refused(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text((BUILTIN_DIR / "taef2" / "vae" / "config.json").read_text())
    (folder / taef2.ENCODER_FILE).write_bytes((BUILTIN_DIR / "taef2" / "vae" / taef2.ENCODER_FILE).read_bytes())
    with pytest.raises(ModelError, match="has no taef2_decoder.safetensors"):
        taef2.Taef2Autoencoder.from_folder(folder)
    # The encoder's file where the decoder's belongs: its keys do not fit the decoder.
    (folder / taef2.DECODER_FILE).write_bytes((BUILTIN_DIR / "taef2" / "vae" / taef2.ENCODER_FILE).read_bytes())
    with pytest.raises(ModelError, match="does not hold taef2's decoder"):
        taef2.Taef2Autoencoder.from_folder(folder)


def test_tiled_encode_and_decode_equal_the_whole_ones(vae):
    """The same function: equal to the last bits of float32 sums, whose order oneDNN picks by shape (a tile is
    another shape: 2·10⁻⁶ measured); a piece's halo or statistics gone wrong would be off by far more."""
    image = photo_like(32, 240, 3)  # 4 × 30 latent px: tiles of 8, pieces of at least MIN_PIECE
    with torch.inference_mode():
        x = images_to_tensor([image], image.shape[:2], "cpu", torch.float32)
        whole = vae.encode(x).latents
        tiled = vae.encode(x, tile=8).latents
        assert (tiled - whole).abs().max() < 1e-5
        assert (vae.decode(whole, tile=8).sample - vae.decode(whole).sample).abs().max() < 1e-5


def test_a_crop_decoded_with_its_pictures_statistics_renders_as_inside_the_picture(vae):
    """glc's pixel fine-tune decodes crops this way. 8 latent px from the crop's edge it renders as the whole
    picture does (the edge's effect fades over about 10 px: 2·10⁻² at 6, 5·10⁻³ at 8); with its own statistics
    it is off everywhere. A picture given its own statistics decodes exactly as without them."""
    image = photo_like(64, 256, 5)
    image[:, 128:] //= 4  # the right half dark: the left crop's own statistics are far off
    with torch.inference_mode():
        z = vae.encode(images_to_tensor([image], image.shape[:2], "cpu", torch.float32)).latents
        statistics = vae.pool_statistics(z)
        whole = vae.decode(z).sample
        assert torch.equal(vae.decode(z, statistics=statistics).sample, whole)
        away = (..., slice(0, 64))  # latent columns 0–7 of the 16 the crop keeps
        in_place = vae.decode(z[..., :16], statistics=statistics).sample[away]
        on_its_own = vae.decode(z[..., :16]).sample[away]
        assert (in_place - whole[away]).abs().max() < 1e-2
        assert (on_its_own - whole[away]).abs().max() > 0.1


def test_memory_is_bounded_by_the_tile_and_the_band_whatever_the_picture(vae, monkeypatch):
    """The full-resolution stages only ever see a tile with its halo, and the pool branch's 256 channels
    only a band of rows: what coding a picture of any size holds beyond a few latent-sized copies."""
    seen = {"encoder": [], "decoder": [], "pool": []}
    hooks = [
        vae.encoder[0].register_forward_hook(lambda m, i, o: seen["encoder"].append(max(i[0].shape[2:]))),
        vae.decoder[taef2.LATENT_STAGE].register_forward_hook(lambda m, i, o: seen["decoder"].append(max(i[0].shape[2:]))),
    ]
    pool = vae.decoder[3].pool
    hidden = pool.hidden  # c1's 256 channels, (B, rows, width, 256): recorded, then passed on
    monkeypatch.setattr(pool, "hidden", lambda x: seen["pool"].append(x.shape[2]) or hidden(x))
    tile, side = 4, max(4 + 2 * taef2.HALO, taef2.MIN_PIECE)
    try:
        with torch.inference_mode():
            z = vae.encode(images_to_tensor([photo_like(32, 240, 1)], (32, 240), "cpu", torch.float32), tile=tile).latents
            vae.decode(z, tile=tile)  # 4 × 30 latent px, wider than a tile with its halo
            vae.decoder[: taef2.LATENT_STAGE](torch.cat([z] * 10, dim=2))  # 40 rows: three bands
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen["encoder"]) == 30 // tile + 1 and max(seen["encoder"]) <= 8 * side < 240
    assert len(seen["decoder"]) == 30 // tile + 1 and max(seen["decoder"]) <= side < 30
    assert max(seen["pool"]) == taef2.BAND_ROWS < 40


THREADS_SCRIPT = """
import hashlib, sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from diffarc.codecs.parts.models import load_model
vae = load_model("builtin:taef2").vae
z = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 32, 24, 70)).astype(np.float32) * 1.5)
with torch.inference_mode():
    x = vae.decode(z).sample
    print(hashlib.sha256(x.numpy().tobytes()).hexdigest(), hashlib.sha256(vae.encode(x).latents.numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_a_fresh_process_decodes_the_same_bits_with_one_and_with_two_threads():
    runs = [subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(n)], capture_output=True, text=True, check=True).stdout
            for n in (1, 2)]  # fmt: skip
    assert runs[0] == runs[1] and len(runs[0].split()) == 2
