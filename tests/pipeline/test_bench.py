"""The bench job: codec specs, per-image measurements, BD-rate, and a whole run into a folder."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from diffarc.codecs.registry import create_codec
from diffarc.pipeline.bench.bdrate import bd_rate, interpolation_for
from diffarc.pipeline.bench.run import BenchOptions, centre_crop_box, measure_point, run_bench
from diffarc.pipeline.bench.specs import SpecError, parse_codec_spec, resolve_reference
from diffarc.codecs.parts.metrics import LPIPS, ms_ssim, psnr
from diffarc.pipeline.bench.throughput import PeakMemory, measure_throughput

from ..conftest import LPIPS_WEIGHTS, photo_like

needs_lpips = pytest.mark.skipif(not LPIPS_WEIGHTS.is_file(), reason=f"LPIPS weights absent: {LPIPS_WEIGHTS}")


@pytest.fixture
def small_images(tmp_path):
    """Three 64×48 PNGs with gradients and texture."""
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(3):
        Image.fromarray(photo_like(48, 64, seed)).save(folder / f"img{seed}.png")
    return folder


# --- codec specs ------------------------------------------------------------------------------------


def qualities(spec: str) -> list[int]:
    return [p.params["quality"] for p in parse_codec_spec(spec).points]


def test_bare_codec_sweeps_its_presets():
    curve = parse_codec_spec("jpeg")
    assert [p.label for p in curve.points] == ["low", "medium", "high"]
    assert [p.params["quality"] for p in curve.points] == [30, 60, 85]


def test_preset_and_explicit_params_are_one_point_each():
    assert qualities("jpeg:high") == [85]
    assert qualities("jpeg:quality=50") == [50]
    [point] = parse_codec_spec("webp:high,method=6").points
    assert point.params == {"quality": 85, "method": 6}


def test_range_sweep_is_evenly_spaced_and_inclusive():
    curve = parse_codec_spec("jpeg:quality=10..90/5")
    assert qualities("jpeg:quality=10..90/5") == [10, 30, 50, 70, 90]
    assert [p.label for p in curve.points][0] == "quality=10"
    assert qualities("jpeg:quality=10..60/4") == [10, 27, 43, 60]  # rounded: quality is an integer


def test_list_sweep_keeps_fixed_params():
    curve = parse_codec_spec("webp:method=6,quality=20|40")
    assert [p.params for p in curve.points] == [{"quality": 20, "method": 6}, {"quality": 40, "method": 6}]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("jpag", "unknown codec 'jpag'"),
        ("jpeg:qualty=50", "no parameter 'qualty'"),
        ("jpeg:best", "no preset 'best'"),
        ("jpeg:quality=10..90", "malformed range"),
        ("jpeg:quality=10..x/5", "malformed range"),
        ("jpeg:quality=10..90/1", "COUNT >= 2"),
        ("jpeg:quality=20|", "malformed list"),
        ("jpeg:quality=1..200/3", "must be <= 95"),
        ("webp:quality=1..3/5", "repeated values"),
        ("webp:quality=10|20,method=1|2", "sweeps one parameter"),
        ("avif:subsampling=4..5/2", "needs a numeric parameter"),
        ("jpeg:quality=50,", "empty item"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(SpecError, match="--codec") as error:
        parse_codec_spec(spec)
    assert message in str(error.value)


def test_reference_is_found_by_spec_or_codec_else_added():
    curves = [parse_codec_spec("jpeg:quality=10|50"), parse_codec_spec("avif:quality=20|40")]
    assert resolve_reference(curves, "avif") == (curves, curves[1])
    assert resolve_reference(curves, "jpeg:quality=10|50") == (curves, curves[0])
    with_added, reference = resolve_reference(curves[:1], "avif")
    assert with_added == [curves[0], reference] and reference.name == "avif"


# --- per-image measurements ---------------------------------------------------------------------------


def test_rows_hold_the_metrics_of_the_real_decode_and_the_real_stream_length():
    images = [photo_like(48, 64, seed) for seed in range(3)]
    codec = create_codec("jpeg", {"quality": 40})
    lpips = LPIPS(LPIPS_WEIGHTS) if LPIPS_WEIGHTS.is_file() else None
    boxes = [centre_crop_box(images[0], side=32)]
    rows, crops = measure_point(codec, ["a", "b", "c"], images, lpips, boxes)

    for row, image in zip(rows, images):
        [stream] = codec.encode([image])
        [decoded] = codec.decode([stream])
        assert row["bytes"] == len(stream)
        assert row["bpp"] == 8 * len(stream) / (64 * 48)
        assert row["psnr"] == psnr(image, decoded)
        assert row["ms_ssim"] == ms_ssim(image, decoded)
        assert row["lpips"] == (lpips(image, decoded) if lpips else None)
        assert row["encode_s"] > 0 and row["decode_s"] > 0
    assert len(crops) == 1 and crops[0].shape == (32, 32, 3)
    assert np.array_equal(crops[0], codec.decode(codec.encode(images[:1]))[0][8:40, 16:48])


def test_crop_box_is_centred_and_never_larger_than_the_image():
    assert centre_crop_box(np.zeros((512, 768, 3), np.uint8)) == (128, 256, 256, 256)
    assert centre_crop_box(np.zeros((48, 300, 3), np.uint8)) == (0, 22, 48, 256)


# --- BD-rate ---------------------------------------------------------------------------------------------

RATES = [0.25, 0.5, 1.0, 2.0]
PSNR = [28.0, 31.0, 34.5, 38.0]
LPIPS_VALUES = [0.30, 0.18, 0.10, 0.05]


@pytest.mark.parametrize("n", [4, 3, 2])  # cubic, then piecewise-linear
@pytest.mark.parametrize("quality, higher_is_better", [(PSNR, True), (LPIPS_VALUES, False)])
def test_bd_rate_of_a_curve_against_itself_is_zero(n, quality, higher_is_better):
    assert abs(bd_rate(RATES[:n], quality[:n], RATES[:n], quality[:n], higher_is_better)) < 1e-9


@pytest.mark.parametrize("n", [4, 3])
@pytest.mark.parametrize("quality, higher_is_better", [(PSNR, True), (LPIPS_VALUES, False)])
def test_bd_rate_of_ten_percent_fewer_bits_is_minus_ten(n, quality, higher_is_better):
    cheaper = [0.9 * r for r in RATES[:n]]
    assert bd_rate(RATES[:n], quality[:n], cheaper, quality[:n], higher_is_better) == pytest.approx(-10, abs=0.5)


def test_better_quality_at_the_same_rate_gives_a_negative_bd_rate():
    assert bd_rate(RATES, PSNR, RATES, [q + 1 for q in PSNR]) < 0
    assert bd_rate(RATES, LPIPS_VALUES, RATES, [v * 0.8 for v in LPIPS_VALUES], higher_is_better=False) < 0
    assert bd_rate(RATES, LPIPS_VALUES, RATES, [v * 1.2 for v in LPIPS_VALUES], higher_is_better=False) > 0


def test_bd_rate_is_none_without_overlap_or_with_unusable_points():
    assert bd_rate(RATES, PSNR, RATES, [q + 20 for q in PSNR]) is None
    assert bd_rate(RATES, PSNR, [1.0], [33.0]) is None
    assert bd_rate(RATES, PSNR, RATES, [28.0, 31.0, 34.5, float("inf")]) is None


def test_interpolation_is_cubic_only_with_four_points_on_both_curves():
    assert interpolation_for(4, 5) == "cubic"
    assert interpolation_for(3, 5) == "piecewise-linear"


# --- a whole run --------------------------------------------------------------------------------------

PLOTS = ["bpp_psnr.png", "bpp_ms_ssim.png", "bpp_lpips.png", "speed.png"]


def test_run_writes_results_plots_and_report(small_images, tmp_path):
    out = tmp_path / "bench"
    weights = str(LPIPS_WEIGHTS) if LPIPS_WEIGHTS.is_file() else None
    options = BenchOptions(
        str(small_images), ["jpeg:quality=20|70", "webp:quality=10|60"], reference="jpeg", out=str(out),
        lpips_weights=weights, limit=2, gallery=1,
    )  # fmt: skip
    results = run_bench(options, log=lambda _: None)

    for name in ["results.json", "results.csv", "report.html", *PLOTS]:
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    assert {"run", "curves", "rows", "bd_rate", "gallery", "reference", "throughput"} <= saved.keys()
    assert {"date", "host", "torch_threads", "device"} <= saved["run"].keys()
    assert saved["images"] == 2 and len(saved["rows"]) == 2 * 4
    assert saved["reference"] == "jpeg:quality=20|70"
    points = {(p["curve"], p["label"]): p for c in saved["curves"] for p in c["points"]}
    assert points["jpeg:quality=20|70", "quality=20"]["params"] == {"quality": 20}
    assert abs(saved["bd_rate"]["jpeg:quality=20|70"]["psnr"]) < 1e-9

    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["curve"], r["label"]) for r in table] == list(points)
    assert float(table[0]["bpp"]) == pytest.approx(points[table[0]["curve"], table[0]["label"]]["bpp"])

    [image] = saved["gallery"]["images"]
    assert [c["curve"] for c in image["crops"]] == ["jpeg:quality=20|70", "webp:quality=10|60"]
    for name in [image["original"], *(c["file"] for c in image["crops"])]:
        assert (out / name).is_file() and name in (out / "report.html").read_text()

    if weights is None:
        pytest.skip(f"LPIPS assertions need {LPIPS_WEIGHTS}")
    assert all(0 < r["lpips"] < 1 for r in saved["rows"])
    assert saved["bd_rate"]["webp:quality=10|60"]["lpips"] is not None


def test_run_without_lpips_weights_leaves_lpips_empty(small_images, tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFARC_LPIPS_WEIGHTS", raising=False)
    messages = []
    out = str(tmp_path / "b")
    options = BenchOptions(str(small_images), ["jpeg:quality=30|60"], reference="jpeg", out=out, gallery=0)
    results = run_bench(options, log=messages.append)
    assert all(r["lpips"] is None for r in results["rows"])
    assert results["bd_rate"]["jpeg:quality=30|60"]["lpips"] is None
    assert any("no LPIPS weights" in m for m in messages)


# --- throughput -------------------------------------------------------------------------------------------


def test_throughput_times_each_batch_size_and_skips_the_unet_without_gpu():
    [point] = parse_codec_spec("jpeg:quality=50").points
    messages = []
    result = measure_throughput([("jpeg:quality=50", point)], photo_like(48, 64, 0), [1, 3], "cpu", messages.append)
    assert [e["batch_size"] for e in result["codecs"]] == [1, 3]
    assert all(e["encode_images_per_s"] > 0 and e["decode_peak_memory_bytes"] > 0 for e in result["codecs"])
    assert result["sd21_unet"] == {"skipped": "no GPU"}
    assert any("SD-2.1 UNet timing skipped" in m for m in messages)


def test_cpu_peak_memory_is_reset_for_each_block():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("the peak RSS cannot be reset here (no writable /proc/self/clear_refs)")
    with PeakMemory("cpu") as quiet:
        pass
    with PeakMemory("cpu") as busy:
        block = np.ones(200 << 20, np.uint8)  # 200 MiB of fresh pages
        del block
    with PeakMemory("cpu") as quiet_again:
        pass
    assert busy.peak_bytes - quiet.peak_bytes > 150 << 20
    assert quiet_again.peak_bytes < busy.peak_bytes - (150 << 20)
