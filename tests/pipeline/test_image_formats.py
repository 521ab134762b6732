"""Sources as phones, cameras and the web write them, through encode and decode on a real local Ray cluster:
HEIC and JPEG XL files, wide-gamut profiles, a damaged HEIC."""

import io

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from diffarc.pipeline.archive import read_failures, require_manifest
from diffarc.pipeline.decode import run_decode
from diffarc.pipeline.encode import EncodeOptions, run_encode
from diffarc.pipeline.storage import Location

from ..colour_spaces import ADOBE_RGB, DISPLAY_P3, SRGB
from ..conftest import photo_like

pytestmark = pytest.mark.slow


def saved(pixels: np.ndarray, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **options)
    return buffer.getvalue()


def test_heic_and_jpeg_xl_sources_encode_and_decode_as_colour_managed_pictures(ray_cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    phone, camera, web = photo_like(48, 64, seed=1), photo_like(40, 56, seed=2), photo_like(32, 48, seed=3)
    (src / "IMG_0001.HEIC").write_bytes(saved(phone, "HEIF", quality=95, icc_profile=DISPLAY_P3.icc()))
    camera_jpeg = saved(camera, "JPEG", quality=95, icc_profile=ADOBE_RGB.icc())
    (src / "camera.jxl").write_bytes(imagecodecs.jpegxl_encode_jpeg(camera_jpeg))  # a JPEG recompressed by a user
    (src / "web.jxl").write_bytes(imagecodecs.jpegxl_encode(web, distance=0.5))
    damaged = saved(phone, "HEIF")
    (src / "damaged.heic").write_bytes(damaged[: len(damaged) // 2])
    (src / "plain.jpg").write_bytes(saved(web, "JPEG", quality=90))  # kept whole: the encode actors hand it over

    # The lossless mode: what comes out is the loaded picture itself, so the loader's colours are seen exactly.
    summary = run_encode(str(src), str(tmp_path / "arc"), EncodeOptions("jxl", {"lossless": 1}, shard_size=4))
    assert (summary.encoded, summary.failed, summary.skipped_non_images) == (4, 1, 0)
    archive = Location(str(tmp_path / "arc"))
    failure = read_failures(archive, require_manifest(archive))["damaged.heic"]
    assert failure.stage == "load" and "cannot read it as HEIF: Invalid input" in failure.reason

    result = run_decode(str(tmp_path / "arc"), str(tmp_path / "out"))
    assert result.decoded == 4 and not result.failures
    assert (tmp_path / "out" / "plain.jpg").read_bytes() == (src / "plain.jpg").read_bytes()
    decoded = {name: np.asarray(Image.open(tmp_path / "out" / f"{name}.png")).astype(float)
               for name in ("IMG_0001", "camera", "web")}  # fmt: skip
    # What a colour-managed viewer shows of each file's pixels, worked out in floating point.
    with Image.open(src / "IMG_0001.HEIC") as heic, Image.open(io.BytesIO(camera_jpeg)) as jpeg:
        stored = {"IMG_0001.HEIC": np.asarray(heic.convert("RGB")), "camera.jxl": np.asarray(jpeg.convert("RGB")),
                  "web.jxl": imagecodecs.jpegxl_decode((src / "web.jxl").read_bytes())}  # fmt: skip
    for name, space in (("IMG_0001.HEIC", DISPLAY_P3), ("camera.jxl", ADOBE_RGB), ("web.jxl", SRGB)):
        as_stored = stored[name]  # the file's own pixels, lossy formats' losses included
        expected = SRGB.from_xyz_d50(space.xyz_d50(as_stored))
        inside = ((expected > 0.5) & (expected < 254.5)).all(axis=-1)
        assert np.abs(decoded[name.split(".")[0]][inside] - expected[inside]).max() <= 1.0, name
    # … and not the numbers of the wide-gamut files taken as sRGB, which is what the loader did before.
    assert np.abs(decoded["IMG_0001"] - phone).mean() > 6 and np.abs(decoded["camera"] - camera).mean() > 6
