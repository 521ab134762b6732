import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from diffarc.codecs.errors import ImageLoadError
from diffarc.pipeline.images import load_rgb


def test_every_awkward_input_loads_as_rgb_or_fails_with_a_reason(bad_inputs):
    folder, expected = bad_inputs
    for name, shape in expected.items():
        data = (folder / name).read_bytes()
        if shape is None:
            with pytest.raises(ImageLoadError) as caught:
                load_rgb(data)
            assert str(caught.value), name
        else:
            pixels = load_rgb(data)
            assert pixels.shape == (*shape, 3) and pixels.dtype == np.uint8, name


def test_reasons_say_what_is_wrong(bad_inputs):
    folder, _ = bad_inputs
    reasons = {}
    for name in ("empty.png", "text.png", "bomb.png", "truncated.jpg"):
        with pytest.raises(ImageLoadError) as caught:
            load_rgb((folder / name).read_bytes())
        reasons[name] = str(caught.value)
    assert "empty" in reasons["empty.png"]
    assert "not a readable image" in reasons["text.png"]
    assert "over the limit" in reasons["bomb.png"]
    assert "truncated" in reasons["truncated.jpg"].lower()


def test_pixel_limit_is_configurable():
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, "PNG")
    assert load_rgb(buffer.getvalue(), max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageLoadError, match="over the limit of 9999"):
        load_rgb(buffer.getvalue(), max_pixels=9_999)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 100, 50)).save(buffer, "PNG")
    return buffer.getvalue()


def test_pillows_own_limit_is_left_as_pillow_set_it():
    # Imports every part that opens images; none may switch off Pillow's guard for the whole process.
    script = (
        "from PIL import Image\n"
        "default = Image.MAX_IMAGE_PIXELS\n"
        "import diffarc.jobs.cli, diffarc.pipeline.images, diffarc.pipeline.encode, diffarc.pipeline.verify\n"
        "import diffarc.pipeline.bench.run, diffarc.codecs.classical\n"
        "print(Image.MAX_IMAGE_PIXELS == default is not None)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_a_limit_above_pillows_own_is_honoured_without_changing_it(monkeypatch):
    # Pillow refuses images over twice its limit; 2500 pixels stands in for a huge scan here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_rgb(png(50, 50), max_pixels=10_000).shape == (50, 50, 3)
    with pytest.raises(ImageLoadError, match="50×50 = 2500 pixels, over the limit of 2000"):
        load_rgb(png(50, 50), max_pixels=2_000)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_formats_that_apply_pillows_limit_themselves_fail_with_a_reason(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buffer = io.BytesIO()
    Image.new("RGB", (50, 50)).save(buffer, "WEBP")
    with pytest.raises(ImageLoadError, match="Pillow's own limit"):
        load_rgb(buffer.getvalue(), max_pixels=10_000)


def test_each_call_keeps_its_own_limit_across_threads(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = png(50, 50)

    def load(limit: int) -> bool:
        try:
            load_rgb(data, max_pixels=limit)
            return True
        except ImageLoadError:
            return False

    limits = [10_000, 2_000] * 50
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(load, limits))
    assert loaded == [limit >= 2500 for limit in limits]


def test_exif_orientation_is_applied(bad_inputs):
    folder, _ = bad_inputs
    assert load_rgb((folder / "rotated.jpg").read_bytes()).shape == (60, 40, 3)


def test_sixteen_bit_keeps_its_most_significant_bits(bad_inputs):
    folder, _ = bad_inputs
    pixels = load_rgb((folder / "sixteen.png").read_bytes())
    raw = np.asarray(Image.open(folder / "sixteen.png"), dtype=np.uint32)
    assert np.array_equal(pixels[:, :, 0], (raw >> 8).astype(np.uint8))


def test_alpha_is_composited_over_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, "PNG")
    assert (load_rgb(buffer.getvalue()) == 255).all()


def test_animation_gives_its_first_frame(bad_inputs):
    folder, _ = bad_inputs
    with Image.open(folder / "animated.gif") as gif:
        first = np.asarray(gif.convert("RGB"))
    assert np.array_equal(load_rgb((folder / "animated.gif").read_bytes()), first)
