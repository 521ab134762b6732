"""`diffarc decode --base-only`: an hfd archive stays readable when its model weights are lost."""

import io
import json
import posixpath
import shutil

import numpy as np
import pytest
from PIL import Image

from diffarc.codecs import container
from diffarc.pipeline.archive import read_shard, require_manifest
from diffarc.pipeline.storage import Location

from ..codecs.test_hfd import save_detail_decoder
from .test_model_options import run

pytestmark = pytest.mark.slow

# Every job here runs one actor (`run` adds --actors 1): each actor loads torch, and what is tested is the
# base layer, not how work is split.


def test_an_hfd_archive_decodes_to_its_avif_base_with_the_weights_gone(ray_cluster, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFARC_MODEL_CACHE", str(tmp_path / "cache"))
    weights = save_detail_decoder(tmp_path / "weights")
    arc = tmp_path / "arc"
    encoded = run("encode", image_folder, arc, "--codec", "hfd", "--param", f"model={weights}", "--param", "quality=30")
    assert encoded.exit_code == 0, encoded.output
    shutil.rmtree(weights)

    full = run("decode", arc, tmp_path / "full", "--json")
    assert full.exit_code != 0 and "fingerprint" in full.output  # the detail decoder cannot run

    decoded = run("decode", arc, tmp_path / "base", "--base-only", "--json")
    assert decoded.exit_code == 0, decoded.output
    assert json.loads(decoded.stdout)["decoded"] == 6
    archive = Location(str(arc))
    manifest = require_manifest(archive)
    for entry in manifest.shards:
        for row in read_shard(archive, entry, columns=["key", "bitstream"]).to_pylist():
            _, payload = container.unpack(manifest.expand(row["bitstream"]))
            with Image.open(io.BytesIO(payload)) as avif:  # Pillow alone: the payload is a plain AVIF file
                expected = np.asarray(avif.convert("RGB"))
            with Image.open(tmp_path / "base" / (posixpath.splitext(row["key"])[0] + ".png")) as png:
                np.testing.assert_array_equal(np.asarray(png), expected)


def test_base_only_is_refused_for_a_codec_without_a_base_layer(ray_cluster, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFARC_MODEL_CACHE", str(tmp_path / "cache"))
    from ..conftest import save_tiny_ldm

    model = save_tiny_ldm(tmp_path / "ldm")
    arc = tmp_path / "arc"
    encoded = run("encode", image_folder, arc, "--codec", "ddcm", "--param", f"model={model}", "--param", "steps=3",
                  "--param", "codebook=4")  # fmt: skip
    assert encoded.exit_code == 0, encoded.output
    refused = run("decode", arc, tmp_path / "out", "--base-only")
    assert refused.exit_code != 0 and "no part that decodes without its model weights" in refused.output
