import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from diffarc.codecs.errors import ImageLoadError
from diffarc.codecs.parts.jxlfile import jxl_size
from diffarc.pipeline.images import load_picture, load_rgb
from diffarc.pipeline.sources import is_image_name

from ..colour_spaces import ADOBE_RGB, DISPLAY_P3, PROPHOTO_RGB, SRGB, cmyk_icc
from ..conftest import photo_like


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


def saved(pixels: np.ndarray, image_format: str, mode: str | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, image_format, **options)
    return buffer.getvalue()


def colours(seed: int) -> np.ndarray:
    """A 24×32 picture of random colours, most of them inside sRGB after conversion from the wide spaces."""
    return np.random.default_rng(seed).integers(20, 200, (24, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("space", [DISPLAY_P3, ADOBE_RGB, PROPHOTO_RGB], ids=lambda s: s.name)
def test_an_embedded_profile_is_converted_to_the_srgb_a_colour_managed_viewer_shows(space):
    pixels = colours(1)
    picture = load_picture(saved(pixels, "PNG", icc_profile=space.icc()))
    # What the profile means, worked out in floating point from the space's definition (not by littleCMS).
    expected = SRGB.from_xyz_d50(space.xyz_d50(pixels))
    inside = ((expected > 0.5) & (expected < 254.5)).all(axis=-1)
    assert inside.sum() > 300  # of 768 colours
    assert np.abs(picture.pixels[inside] - expected[inside]).max() <= 1.0
    assert picture.profile == space.name and picture.converted and picture.format == "PNG"


@pytest.mark.parametrize(
    "image_format, options",
    [("JPEG", {"quality": 95}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("AVIF", {"quality": 95}),
     ("HEIF", {"quality": 95})],
)  # fmt: skip
def test_every_format_that_carries_a_profile_has_it_applied(image_format, options):
    data = saved(colours(2), image_format, icc_profile=DISPLAY_P3.icc(), **options)
    with Image.open(io.BytesIO(data)) as image:
        as_stored = np.asarray(image.convert("RGB"))  # the file's own pixels, lossy formats' losses included
    expected = SRGB.from_xyz_d50(DISPLAY_P3.xyz_d50(as_stored))
    inside = ((expected > 0.5) & (expected < 254.5)).all(axis=-1)
    picture = load_picture(data)
    assert np.abs(picture.pixels[inside] - expected[inside]).max() <= 1.0
    assert (picture.profile, picture.converted, picture.format) == ("Display P3", True, image_format)


def test_a_jpeg_xl_keeps_the_profile_of_the_jpeg_it_was_made_from():
    jpeg = saved(colours(3), "JPEG", quality=95, icc_profile=ADOBE_RGB.icc())
    from_jxl = load_picture(imagecodecs.jpegxl_encode_jpeg(jpeg))
    assert np.array_equal(from_jxl.pixels, load_picture(jpeg).pixels)
    assert (from_jxl.format, from_jxl.profile, from_jxl.converted) == ("JXL", "Adobe RGB (1998)", True)


def test_without_a_profile_the_pixels_are_taken_as_srgb():
    pixels = colours(4)
    picture = load_picture(saved(pixels, "PNG"))
    assert np.array_equal(picture.pixels, pixels)
    assert (picture.profile, picture.converted) == (None, False)


def test_a_cmyk_jpeg_is_converted_by_its_profile_not_by_a_formula():
    # A press profile: cyan ink also takes a third of the green away, unlike Pillow's profile-free formula.
    def press(inks: np.ndarray) -> np.ndarray:
        c, m, y, k = np.moveaxis(inks, -1, 0)
        return 255 * np.stack([(1 - c) * (1 - k), (1 - c / 3) * (1 - m) * (1 - k), (1 - y) * (1 - k)], axis=-1)

    levels = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 0.5], [0.25, 0.75, 0, 0]])
    patches = np.repeat(np.repeat((levels * 255).round().astype(np.uint8)[None], 16, axis=0), 16, axis=1)
    data = saved(patches, "JPEG", "CMYK", quality=95, icc_profile=cmyk_icc("Test press CMYK", press))
    pixels = load_picture(data).pixels[8, 8::16].astype(float)  # the middle row of each 16×16 patch
    assert np.abs(pixels - press(levels)).max() <= 3
    assert load_picture(data).profile == "Test press CMYK"
    formula = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[8, 8::16].astype(float)
    assert np.abs(formula - press(levels)).max() > 60  # what the loader gave before profiles were applied


def test_a_profile_that_cannot_be_used_leaves_the_pixels_as_srgb():
    pixels = colours(5)
    broken = load_picture(saved(pixels, "PNG", icc_profile=b"not a colour profile at all"))
    assert np.array_equal(broken.pixels, pixels) and (broken.profile, broken.converted) == ("(an unreadable profile)", False)
    cmyk_on_rgb = load_picture(saved(pixels, "PNG", icc_profile=cmyk_icc("CMYK", lambda inks: 255 - 255 * inks[:, :3])))
    assert np.array_equal(cmyk_on_rgb.pixels, pixels) and (cmyk_on_rgb.profile, cmyk_on_rgb.converted) == ("CMYK", False)


def test_alpha_is_composited_over_white_after_the_colour_conversion():
    pixels = colours(6)
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
    rgba[:, :16, 3] = 0
    picture = load_picture(saved(rgba, "PNG", icc_profile=DISPLAY_P3.icc()))
    assert (picture.pixels[:, :16] == 255).all()
    opaque = load_picture(saved(pixels, "PNG", icc_profile=DISPLAY_P3.icc())).pixels
    assert np.array_equal(picture.pixels[:, 16:], opaque[:, 16:])


def test_heic_and_jpeg_xl_files_are_listed_and_load():
    pixels = photo_like(24, 32, seed=7)
    heic = load_picture(saved(pixels, "HEIF", quality=95))
    assert heic.format == "HEIF" and heic.pixels.shape == pixels.shape
    assert np.abs(heic.pixels.astype(int) - pixels).mean() < 6
    jxl = load_picture(imagecodecs.jpegxl_encode(pixels, lossless=True))
    assert jxl.format == "JXL" and np.array_equal(jxl.pixels, pixels)
    assert all(is_image_name(name) for name in ("IMG_0001.HEIC", "a.heif", "b.hif", "c.jxl"))


def test_heic_and_jpeg_xl_are_held_to_the_pixel_limit():
    pixels = np.zeros((64, 64, 3), np.uint8)
    for data in (saved(pixels, "HEIF"), imagecodecs.jpegxl_encode(pixels, lossless=True)):
        with pytest.raises(ImageLoadError, match="64×64 = 4096 pixels, over the limit of 4095"):
            load_picture(data, max_pixels=4095)
        assert load_picture(data, max_pixels=4096).pixels.shape == (64, 64, 3)


def jxl_header(width: int, height: int) -> bytes:
    """A JPEG XL codestream's signature and SizeHeader declaring width × height (sizes up to 2^18), and no more."""
    bits = 0b0 | (0b10 << 1) | ((height - 1) << 3) | (0 << 21) | (0b10 << 24) | ((width - 1) << 26)
    return b"\xff\x0a" + bits.to_bytes(6, "little")


def test_a_jpeg_xl_bomb_is_refused_from_its_header_before_anything_is_decoded():
    assert jxl_size(jxl_header(200_000, 150_000)) == (200_000, 150_000)
    # Only a header: had the plugin been given it, the failure would be libjxl's, not the limit.
    with pytest.raises(ImageLoadError, match="200000×150000 = 30000000000 pixels, over the limit"):
        load_picture(jxl_header(200_000, 150_000) + bytes(100))


@pytest.mark.parametrize("container", [False, True])
def test_jpeg_xl_sizes_are_read_from_the_header(container):
    for height, width in [(1, 1), (8, 8), (17, 33), (300, 400), (256, 512), (90, 160), (1000, 7)]:
        data = imagecodecs.jpegxl_encode(np.zeros((height, width, 3), np.uint8), usecontainer=container)
        assert jxl_size(data) == (width, height)


def test_damaged_heic_and_jpeg_xl_files_fail_with_a_reason():
    pixels = colours(8)
    heic, jxl = saved(pixels, "HEIF"), imagecodecs.jpegxl_encode(pixels, lossless=True)
    with pytest.raises(ImageLoadError, match="damaged or truncated"):
        load_picture(heic[: len(heic) // 2])
    with pytest.raises(ImageLoadError, match="not a readable image: cannot read it as HEIF: Invalid input"):
        load_picture(heic[:200])  # cut inside the boxes that say what the file holds
    with pytest.raises(ImageLoadError, match="JPEG XL data is damaged or truncated"):
        load_picture(jxl[: len(jxl) // 2])
    with pytest.raises(ImageLoadError, match="JPEG XL"):
        load_picture(jxl[:3])


def enum(value: int) -> list[tuple[int, int]]:
    """A JPEG XL Enum field: U32(0, 1, 4 bits + 2, 6 bits + 18), as (value, bit count) pairs."""
    return [(value, 2)] if value < 2 else [(2, 2), (value - 2, 4)] if value < 18 else [(3, 2), (value - 18, 6)]


def jxl_declaring(want_icc: bool = False, primaries: int = 1) -> bytes:
    """A 16×16 JPEG XL codestream whose ImageMetadata declares an ICC profile or RGB of these primaries (D65,
    sRGB curve), then zeros: fields as ISO/IEC 18181-1 lays them out, least significant bit first."""
    fields = [(1, 1), (1, 5), (1, 3)]  # SizeHeader: small, height 2·8, ratio 1:1
    fields += [(0, 1), (0, 1), (0, 1), (0, 2), (1, 1), (0, 2), (1, 1)]  # not all default, no extras, 8 bits, …
    fields += [(0, 1), (int(want_icc), 1), (0, 2)]  # colour encoding: not default, want_icc, RGB
    if not want_icc:  # white point D65, the primaries, no gamma, the sRGB curve, perceptual intent
        fields += [*enum(1), *enum(primaries), (0, 1), *enum(13), *enum(0)]
    bits, position = 0, 0
    for value, count in fields:
        bits, position = bits | value << position, position + count
    return b"\xff\x0a" + bits.to_bytes(-(-position // 8), "little") + bytes(64)


def test_a_jpeg_xl_whose_colours_cannot_be_read_is_refused_with_the_reason_not_taken_as_srgb():
    # The same fields with sRGB primaries parse as sRGB (libjxl then finds no image data after them).
    with pytest.raises(ImageLoadError, match="JPEG XL data is damaged or truncated"):
        load_picture(jxl_declaring(primaries=1))
    with pytest.raises(ImageLoadError, match=r"other than sRGB \(colour_space 0, white_point 1, primaries 11, transfer 13\)"):
        load_picture(jxl_declaring(primaries=11))  # Display P3
    with pytest.raises(ImageLoadError, match=r"other than sRGB \(an ICC profile\)"):
        load_picture(jxl_declaring(want_icc=True))


def test_a_jpeg_xl_of_linear_samples_is_turned_into_srgb():
    pixels = colours(9)
    linear = imagecodecs.jpegxl_encode(pixels.astype(np.uint16) * 257, lossless=True)  # imagecodecs: 16 bits are linear
    values = pixels / 255
    expected = 255 * np.where(values <= 0.0031308, 12.92 * values, 1.055 * values ** (1 / 2.4) - 0.055)
    assert np.array_equal(load_picture(linear).pixels, np.rint(expected))


def test_colour_conversion_gives_the_same_pixels_on_many_threads_at_once():
    files = [saved(colours(seed), "PNG", icc_profile=space.icc()) for seed in range(4) for space in (DISPLAY_P3, ADOBE_RGB)]
    alone = [load_picture(data).pixels for data in files]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda data: load_picture(data).pixels, files * 8))
    assert all(np.array_equal(p, alone[i % len(files)]) for i, p in enumerate(together))
