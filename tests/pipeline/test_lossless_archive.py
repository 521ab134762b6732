"""The lossless mode through the pipeline: encode keeps JPEG sources whole, each row says what the archive
promises about its item, decode and cat give the JPEG back byte for byte (and other items as sRGB-tagged
PNGs), verify checks every rebuilt original and exact picture, info counts them; shards written before
rows said so read as lossy. Real JPEG and PNG files, the real jxl codec, real Parquet; a real local Ray for
decode and verify."""

import hashlib
import io
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffarc.codecs.errors import BitstreamError
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.archive import SHARD_SCHEMA_BEFORE_FIDELITY, ArchiveWriter, CodecSpec, load_manifest, read_shard
from diffarc.pipeline.batches import encode_items, encoded_item
from diffarc.pipeline.decode import cat_item, run_decode
from diffarc.pipeline.images import load_picture
from diffarc.pipeline.info import archive_info
from diffarc.pipeline.ray_data import ShardEncoder
from diffarc.pipeline.storage import Location
from diffarc.pipeline.verify import run_verify

from ..colour_spaces import ADOBE_RGB
from ..conftest import photo_like
from .test_archive import edit_manifest

LOSSLESS = {"lossless": 1}


def saved(pixels: np.ndarray, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A camera JPEG with an Adobe RGB profile, a web JPEG without one, a PNG scan."""
    src = tmp_path_factory.mktemp("lossless") / "src"
    (src / "web").mkdir(parents=True)
    (src / "camera.jpg").write_bytes(saved(photo_like(24, 32, seed=1), "JPEG", quality=90, icc_profile=ADOBE_RGB.icc()))
    (src / "web" / "plain.jpeg").write_bytes(saved(photo_like(16, 24, seed=2), "JPEG", quality=85))
    (src / "scan.png").write_bytes(saved(photo_like(20, 28, seed=3), "PNG"))
    return src


@pytest.fixture(scope="module")
def archive(sources):
    """The sources encoded with jxl lossless=1, in this process, by the shard encoder encode's actors and
    write_archive use (`encode_items`); test_image_formats.py encodes a JPEG this way through the actors."""
    codec = create_codec("jxl", LOSSLESS)
    location = Location(str(sources.parent / "arc"))
    writer = ArchiveWriter(location, CodecSpec.of(codec), str(sources))
    files = {str(path.relative_to(sources)): path.read_bytes() for path in sources.rglob("*") if path.is_file()}
    loaded = [encoded_item(key, load_picture(data), data) for key, data in sorted(files.items())]
    failures = []
    writer.commit(*encode_items(codec, loaded, 2, location, writer.manifest.codec, failures), failures)
    writer.finish()
    return location


def rows(location: Location) -> dict[str, dict]:
    entry = load_manifest(location).shards[0]
    return {row["key"]: row for row in read_shard(location, entry).drop_columns(["bitstream"]).to_pylist()}


def test_encode_keeps_jpegs_whole_and_each_row_says_what_the_archive_promises(archive, sources):
    found = rows(archive)
    promised = {key: (r["fidelity"], r["source_format"], r["colour_converted"]) for key, r in found.items()}
    assert promised == {
        "camera.jpg": ("byte-exact", "JPEG", True),
        "scan.png": ("pixel-exact", "PNG", False),
        "web/plain.jpeg": ("byte-exact", "JPEG", False),
    }
    assert found["camera.jpg"]["source_profile"] == "Adobe RGB (1998)" and found["scan.png"]["source_profile"] == ""
    facts = archive_info(archive.url)
    assert facts["fidelity"] == {"byte-exact": 2, "pixel-exact": 1, "lossy": 0} and facts["colour_converted"] == 1
    # cat gives the JPEG itself back, and the PNG's picture exactly, tagged sRGB.
    assert cat_item(archive.url, "camera.jpg") == (sources / "camera.jpg").read_bytes()
    with Image.open(io.BytesIO(cat_item(archive.url, "scan.png"))) as png:
        assert png.format == "PNG" and png.info.get("srgb") == 0 and "gamma" in png.info
        assert np.array_equal(np.asarray(png), load_picture((sources / "scan.png").read_bytes()).pixels)


@pytest.mark.slow
def test_write_archive_keeps_files_given_as_bytes_and_rows_of_pixels_are_pixel_exact(ray_cluster, tmp_path):
    # write_archive's actor class, called here: it asks Ray for its GPUs, so Ray must be up.
    jpeg, png = saved(photo_like(16, 24, seed=4), "JPEG"), saved(photo_like(16, 24, seed=5), "PNG")
    location = Location(str(tmp_path / "arc"))
    spec = CodecSpec.of(create_codec("jxl", LOSSLESS))
    encoder = ShardEncoder(location, spec, LOSSLESS, set(), batch_size=4, max_pixels=10_000)
    as_bytes = encoder({"key": np.array(["a.jpg", "b.png"]), "bytes": np.array([jpeg, png], dtype=object)})
    as_pixels = encoder({"key": np.array(["c"]), "image": np.stack([photo_like(16, 24, seed=6)])})
    assert as_bytes["error"] == [""] and as_pixels["error"] == [""]
    written = [e for e in location.list_files() if e.startswith("shards/")]
    promised = {}
    for name in written:
        table = pq.read_table(location.path(name), columns=["key", "fidelity", "source_format"])
        promised.update((r["key"], (r["fidelity"], r["source_format"])) for r in table.to_pylist())
    assert promised == {"a.jpg": ("byte-exact", "JPEG"), "b.png": ("pixel-exact", "PNG"), "c": ("pixel-exact", "")}


def test_shards_written_before_rows_said_their_fidelity_read_as_lossy(archive, tmp_path):
    old = Location(str(shutil.copytree(archive.url, tmp_path / "old")))
    entry = load_manifest(old).shards[0]
    table = pq.read_table(old.path(entry.path)).select(SHARD_SCHEMA_BEFORE_FIDELITY.names)
    pq.write_table(table.cast(SHARD_SCHEMA_BEFORE_FIDELITY), old.path(entry.path))
    data = open(old.path(entry.path), "rb").read()
    edit_manifest(old, lambda d: d["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    read = read_shard(old, load_manifest(old).shards[0], whole=True)
    assert set(read.column("fidelity").to_pylist()) == {"lossy"} and set(read.column("source_format").to_pylist()) == {""}
    assert archive_info(old.url)["fidelity"] == {"byte-exact": 0, "pixel-exact": 0, "lossy": 3}


def with_wrong_source_sha256(archive: Location, copy, key: str) -> Location:
    """A copy of the archive whose row for `key` records another source SHA-256 (shard and manifest agreeing)."""
    tampered = Location(str(shutil.copytree(archive.url, copy)))
    entry = load_manifest(tampered).shards[0]
    table = pq.read_table(tampered.path(entry.path))
    sha = [("0" * 64 if k == key else s) for k, s in zip(table["key"].to_pylist(), table["source_sha256"].to_pylist())]
    pq.write_table(table.set_column(table.schema.get_field_index("source_sha256"), "source_sha256", pa.array(sha)),
                   tampered.path(entry.path))  # fmt: skip
    data = open(tampered.path(entry.path), "rb").read()
    edit_manifest(tampered, lambda d: d["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return tampered


def test_an_original_is_given_back_only_when_its_sha256_is_the_sources(archive, sources, tmp_path):
    tampered = with_wrong_source_sha256(archive, tmp_path / "arc", "camera.jpg")
    with pytest.raises(BitstreamError, match="the file rebuilt from its stream has SHA-256 [0-9a-f]{64}, the source's is 0{64}"):
        cat_item(tampered.url, "camera.jpg")
    assert cat_item(tampered.url, "web/plain.jpeg") == (sources / "web" / "plain.jpeg").read_bytes()


@pytest.mark.slow
def test_decode_writes_each_jpeg_back_under_its_key_and_the_others_as_srgb_pngs(ray_cluster, archive, sources, tmp_path):
    summary = run_decode(archive.url, str(tmp_path / "out"))
    assert summary.decoded == 3 and not summary.failures
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["camera.jpg", "scan.png", "web/plain.jpeg"]
    for key in ("camera.jpg", "web/plain.jpeg"):
        assert (tmp_path / "out" / key).read_bytes() == (sources / key).read_bytes()
    with Image.open(tmp_path / "out" / "scan.png") as png:
        assert png.info.get("srgb") == 0
        assert np.array_equal(np.asarray(png), load_picture((sources / "scan.png").read_bytes()).pixels)


@pytest.mark.slow
def test_verify_calls_a_wrong_original_or_an_inexact_picture_not_intact(ray_cluster, archive, sources, tmp_path):
    tampered = with_wrong_source_sha256(archive, tmp_path / "arc", "camera.jpg")
    originals = shutil.copytree(sources, tmp_path / "src")
    scan = load_picture((originals / "scan.png").read_bytes()).pixels.copy()
    scan[3, 4, 1] ^= 1
    (originals / "scan.png").write_bytes(saved(scan, "PNG"))

    report = run_verify(tampered.url, against=str(originals))
    assert not report.intact and not report.problems
    reasons = {f.key: f.reason for f in report.failures}
    assert sorted(reasons) == ["camera.jpg", "scan.png"]
    assert f"SHA-256 {hashlib.sha256((sources / 'camera.jpg').read_bytes()).hexdigest()}" in reasons["camera.jpg"]
    assert reasons["scan.png"] == "pixel-exact, but 1 of its pixels differ from the source's picture"
