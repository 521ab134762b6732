"""`diffarc encode` as a user runs it, on a real local Ray: an image the codec cannot encode."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffarc.jobs.cli import main
from diffarc.jobs.options import EXIT_ITEMS_FAILED
from diffarc.pipeline.archive import read_failures, read_shard, require_manifest
from diffarc.pipeline.storage import Location

from ..conftest import photo_like

pytestmark = pytest.mark.slow


def test_an_image_the_codec_refuses_fails_alone_even_in_a_batch_of_one(ray_cluster, image_folder, tmp_path):
    # WebP cannot encode an image wider than 16383 px; the PNG itself loads fine.
    Image.fromarray(np.tile(photo_like(1, 100, seed=3), (1, 200, 1))).save(image_folder / "wide.png")
    arc = tmp_path / "arc"
    result = CliRunner().invoke(
        main, ["encode", str(image_folder), str(arc), "--codec", "webp", "--batch-size", "1", "--shard-size", "2",
               "--json"],
    )  # fmt: skip
    assert result.exit_code == EXIT_ITEMS_FAILED, result.output
    summary = json.loads(result.stdout)
    assert (summary["encoded"], summary["failed"]) == (6, 1)
    archive = Location(str(arc))
    manifest = require_manifest(archive)
    failures = read_failures(archive, manifest)
    assert list(failures) == ["wide.png"]
    assert failures["wide.png"].stage == "encode" and "16383" in failures["wide.png"].reason
    keys = [k for e in manifest.shards for k in read_shard(archive, e, columns=["key"]).column("key").to_pylist()]
    assert sorted(keys) == ["a.png", "b.jpg", "c.png", "d.png", "sub/e.jpg", "sub/f.png"]  # each exactly once
    assert manifest.complete


def test_max_pixels_reaches_the_manifest_and_decode_and_verify_take_their_own(ray_cluster, image_folder, tmp_path):
    arc = tmp_path / "arc"
    encoded = CliRunner().invoke(
        main, ["encode", str(image_folder), str(arc), "--codec", "jpeg", "--max-pixels", "3000"]
    )
    assert encoded.exit_code == EXIT_ITEMS_FAILED, encoded.output  # a.png and d.png are larger
    # The manifest records the largest image the archive holds (at most the limit), the bound decode applies.
    sizes = [w * h for w, h in (Image.open(path).size for path in image_folder.rglob("*.*"))]
    largest = max(size for size in sizes if size <= 3000)
    assert require_manifest(Location(str(arc))).max_pixels == largest <= 3000
    assert CliRunner().invoke(main, ["decode", str(arc), str(tmp_path / "out")]).exit_code == 0
    strict = CliRunner().invoke(main, ["decode", str(arc), str(tmp_path / "strict"), "--max-pixels", "1000", "--json"])
    assert strict.exit_code == EXIT_ITEMS_FAILED
    assert sorted(f["key"] for f in json.loads(strict.stdout)["failures"]) == ["b.jpg", "sub/e.jpg"]
    assert CliRunner().invoke(main, ["verify", str(arc), "--max-pixels", "1000"]).exit_code == EXIT_ITEMS_FAILED
    assert CliRunner().invoke(main, ["verify", str(arc)]).exit_code == 0
