"""`diffarc bench` as a user calls it: arguments in, an output folder and stdout out."""

import json

from click.testing import CliRunner
from PIL import Image

from diffarc.jobs.bench import bench

from ..conftest import photo_like


def test_bench_prints_json_summary_and_adds_the_reference(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(2):
        Image.fromarray(photo_like(48, 64, seed)).save(folder / f"img{seed}.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        bench,
        [str(folder), "--codec", "jpeg:quality=20|70", "--reference", "webp:quality=30|60", "--out", str(out),
         "--gallery", "1", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [c["name"] for c in summary["curves"]] == ["jpeg:quality=20|70", "webp:quality=30|60"]
    assert summary["reference"] == "webp:quality=30|60"
    assert set(summary["bd_rate"]) == {"jpeg:quality=20|70", "webp:quality=30|60"}
    assert "rows" not in summary
    assert (out / "report.html").is_file()


def test_bench_rejects_a_bad_spec_before_running(tmp_path):
    result = CliRunner().invoke(bench, [str(tmp_path), "--codec", "jpeg:quality=10..90", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "malformed range" in result.output and "START..STOP/COUNT" in result.output
    assert not (tmp_path / "o").exists()


def test_bench_rejects_bad_batch_sizes(tmp_path):
    result = CliRunner().invoke(bench, [str(tmp_path), "--codec", "jpeg", "--batch-sizes", "1,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_bench_skips_images_over_max_pixels(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(photo_like(48, 64, 0)).save(folder / "small.png")
    Image.fromarray(photo_like(96, 128, 1)).save(folder / "large.png")
    result = CliRunner().invoke(
        bench, [str(folder), "--codec", "jpeg:quality=50", "--reference", "jpeg:quality=50", "--out",
                str(tmp_path / "out"), "--gallery", "0", "--max-pixels", "5000", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 1
    assert [s["key"] for s in summary["skipped"]] == ["large.png"]
    assert "over the limit of 5000" in summary["skipped"][0]["reason"]
