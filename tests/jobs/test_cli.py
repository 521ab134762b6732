"""The `diffarc` command as a user runs it: exit codes, --json, summaries, cat, and hostile keys."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffarc.jobs.cli import main
from diffarc.jobs.options import EXIT_BELOW_THRESHOLD, EXIT_ITEMS_FAILED
from diffarc.pipeline.archive import ArchiveWriter, CodecSpec, EncodedItem, write_shard
from diffarc.pipeline.storage import Location

from ..pipeline.test_archive import edit_manifest

pytestmark = pytest.mark.slow


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_encode_exit_code_says_whether_items_failed(ray_cluster, bad_inputs, image_folder, tmp_path):
    folder, expected = bad_inputs
    failed = run("encode", folder, tmp_path / "bad-arc", "--codec", "webp", "--json")
    assert failed.exit_code == EXIT_ITEMS_FAILED, failed.output
    summary = json.loads(failed.stdout)
    assert summary["failed"] == sum(1 for v in expected.values() if v is None)
    ok = run("encode", image_folder, tmp_path / "arc", "--codec", "jpeg", "--param", "quality=80")
    assert ok.exit_code == 0, ok.output
    assert "encoded 6 images" in ok.output


def test_info_reports_ratio_against_source_bytes(ray_cluster, image_folder, tmp_path):
    assert run("encode", image_folder, tmp_path / "arc", "--codec", "jpeg").exit_code == 0
    facts = json.loads(run("info", tmp_path / "arc", "--json", "--price-per-gb-month", "0.02").stdout)
    source = sum(p.stat().st_size for p in image_folder.rglob("*") if p.is_file())
    assert facts["items"] == 6 and facts["source_bytes"] == source
    assert facts["ratio"] == pytest.approx(source / facts["archive_bytes"])
    assert facts["saved_per_month"] == pytest.approx((source - facts["archive_bytes"]) / 1e9 * 0.02)
    assert 0 < facts["bpp"]["min"] <= facts["bpp"]["median"] <= facts["bpp"]["max"]
    text = run("info", tmp_path / "arc").output
    assert "ratio" in text and "saves $" in text


def test_cat_returns_the_same_image_as_decode(ray_cluster, image_folder, tmp_path):
    assert run("encode", image_folder, tmp_path / "arc", "--codec", "webp", "--shard-size", "2").exit_code == 0
    assert run("decode", tmp_path / "arc", tmp_path / "out").exit_code == 0
    result = run("cat", tmp_path / "arc", "sub/e.jpg", "-o", tmp_path / "e.png")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "e.png")), np.asarray(Image.open(tmp_path / "out/sub/e.png")))
    missing = run("cat", tmp_path / "arc", "nope.png")
    assert missing.exit_code == 1 and "not in the archive" in missing.output


def test_verify_exit_codes(ray_cluster, image_folder, tmp_path):
    assert run("encode", image_folder, tmp_path / "arc", "--codec", "jpeg").exit_code == 0
    intact = run("verify", tmp_path / "arc", "--json")
    assert intact.exit_code == 0 and json.loads(intact.stdout)["intact"]
    strict = run("verify", tmp_path / "arc", "--against", image_folder, "--min-psnr", "80", "--json")
    assert strict.exit_code == EXIT_BELOW_THRESHOLD
    assert len(json.loads(strict.stdout)["below_threshold"]) == 6


def test_decode_refuses_keys_that_escape_the_destination(ray_cluster, tmp_path):
    from diffarc.codecs.registry import create_codec

    codec = create_codec("jpeg")
    stream = codec.encode([np.zeros((8, 8, 3), np.uint8)])[0]
    archive = Location(str(tmp_path / "arc"))
    spec = CodecSpec("jpeg", codec.config, "")
    writer = ArchiveWriter(archive, spec, source="hostile")
    writer.commit(write_shard(archive, [EncodedItem("fine.jpg", stream, 8, 8, 1, "0" * 64)], spec), ["fine.jpg"], [])
    writer.finish()
    # A writer keeps such keys out; a hostile archive's author adds them by hand.
    hostile = write_shard(archive, [EncodedItem(k, stream, 8, 8, 1, "0" * 64) for k in ["../escape.jpg", "/abs.jpg"]], spec)
    edit_manifest(archive, lambda document: document["shards"].append(hostile.__dict__))
    result = run("decode", tmp_path / "arc", tmp_path / "out")
    assert result.exit_code == EXIT_ITEMS_FAILED
    assert "not a safe relative path" in result.output
    assert (tmp_path / "out" / "fine.png").exists()
    assert not (tmp_path / "escape.png").exists() and not list((tmp_path / "out").rglob("abs*"))


def test_bad_usage_and_missing_inputs_fail_clearly(ray_cluster, tmp_path):
    assert run("encode", tmp_path / "nowhere", tmp_path / "arc").exit_code == 1
    bad_param = run("encode", tmp_path, tmp_path / "arc", "--codec", "jpeg", "--param", "quality=500")
    assert bad_param.exit_code == 1 and "quality" in bad_param.output
    assert run("encode", tmp_path, tmp_path / "arc", "--param", "novalue").exit_code == 2
    no_archive = run("info", tmp_path / "empty")
    assert no_archive.exit_code == 1 and "no diffarc archive" in no_archive.output


def test_codecs_lists_parameters_and_presets():
    listed = json.loads(run("codecs", "--json").stdout)["codecs"]
    jpeg = next(c for c in listed if c["name"] == "jpeg")
    assert jpeg["params"][0]["name"] == "quality" and "high" in jpeg["presets"]
    assert any(c["default"] for c in listed)
