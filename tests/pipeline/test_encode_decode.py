"""Encode, decode and verify on a real local Ray cluster (one per module)."""

import dataclasses
import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffarc.codecs import container
from diffarc.codecs.registry import codec_for_header, create_codec
from diffarc.pipeline.archive import MANIFEST, SHARD_SCHEMA_BEFORE_FIDELITY, read_failures, read_shard, require_manifest
from diffarc.pipeline.decode import cat_item, run_decode
from diffarc.pipeline.encode import EncodeOptions, run_encode
from diffarc.pipeline.images import load_rgb
from diffarc.pipeline.keys import output_name
from diffarc.codecs.parts.metrics import psnr
from diffarc.pipeline.storage import Location
from diffarc.pipeline.verify import Thresholds, run_verify

from ..conftest import photo_like, save_tiny_ldm

pytestmark = pytest.mark.slow


def archive_keys(path) -> list[str]:
    archive = Location(str(path))
    manifest = require_manifest(archive)
    return [k for e in manifest.shards for k in read_shard(archive, e, columns=["key"]).column("key").to_pylist()]


def test_every_bad_input_is_encoded_or_in_the_failure_table(ray_cluster, bad_inputs, tmp_path):
    folder, expected = bad_inputs
    summary = run_encode(str(folder), str(tmp_path / "arc"), EncodeOptions("jpeg", shard_size=4, batch_size=3))
    good = {k for k, shape in expected.items() if shape is not None}
    bad = set(expected) - good
    assert sorted(archive_keys(tmp_path / "arc")) == sorted(good)
    failures = read_failures(Location(str(tmp_path / "arc")), require_manifest(Location(str(tmp_path / "arc"))))
    assert set(failures) == bad
    assert all(f.stage in ("load", "fetch") and f.reason for f in failures.values())
    assert summary.encoded == len(good) and summary.failed == len(bad)

    result = run_decode(str(tmp_path / "arc"), str(tmp_path / "out"))
    assert result.decoded == len(good) and not result.failures
    for key in good:
        with Image.open(tmp_path / "out" / (key.rsplit(".", 1)[0] + ".png")) as image:
            assert (image.height, image.width) == expected[key], key


def test_decode_round_trip_subsets_and_resume(ray_cluster, image_folder, tmp_path):
    run_encode(str(image_folder), str(tmp_path / "arc"), EncodeOptions("webp", {"quality": 90}, shard_size=2))
    out = tmp_path / "out"
    first = run_decode(str(tmp_path / "arc"), str(out), prefix="sub/")
    assert first.decoded == 2 and sorted(p.name for p in (out / "sub").iterdir()) == ["e.png", "f.png"]
    assert not (out / "a.png").exists()
    again = run_decode(str(tmp_path / "arc"), str(out))  # a re-run skips what is already there
    assert (again.decoded, again.skipped_existing) == (4, 2)
    codec = create_codec("webp", {"quality": 90})
    direct = codec.decode(codec.encode([np.asarray(Image.open(image_folder / "a.png").convert("RGB"))]))[0]
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), direct)  # the pipeline adds no loss of its own
    chosen = run_decode(str(tmp_path / "arc"), str(tmp_path / "few"), keys=["c.png", "missing.png"])
    assert chosen.decoded == 1 and [(f.key, f.reason) for f in chosen.failures] == [("missing.png", "key not in archive")]


def rewrite_shard(archive_path, mutate):
    """Apply `mutate(rows)` to the first shard and re-register it, as damage that slipped past storage."""
    archive = Location(str(archive_path))
    manifest = require_manifest(archive)
    entry = manifest.shards[0]
    table = read_shard(archive, entry)
    rows = table.to_pylist()
    mutate(rows)
    new = pa.Table.from_pylist(rows, schema=table.schema)
    pq.write_table(new, archive_path / entry.path)
    data = (archive_path / entry.path).read_bytes()
    entry.bytes, entry.sha256 = len(data), hashlib.sha256(data).hexdigest()
    archive.write_atomic(MANIFEST, manifest.to_json())
    return [r["key"] for r in rows]


def test_damaged_streams_fail_clearly_and_the_rest_decode(ray_cluster, image_folder, tmp_path):
    run_encode(str(image_folder), str(tmp_path / "arc"), EncodeOptions("jpeg", shard_size=6))

    manifest = require_manifest(Location(str(tmp_path / "arc")))

    def damage(rows):
        flipped = bytearray(rows[0]["bitstream"])
        flipped[len(flipped) // 2] ^= 0x10
        rows[0]["bitstream"] = bytes(flipped)
        rows[1]["bitstream"] = rows[1]["bitstream"][:12]
        # A full (standalone) stream among compact ones is read as it is: this one names other weights.
        header, payload = container.unpack(manifest.expand(rows[2]["bitstream"]))
        rows[2]["bitstream"] = container.pack(dataclasses.replace(header, fingerprint=b"\x01" * 32), payload)

    keys = rewrite_shard(tmp_path / "arc", damage)
    result = run_decode(str(tmp_path / "arc"), str(tmp_path / "out"))
    reasons = {f.key: f.reason for f in result.failures}
    assert result.decoded == 3
    assert "CRC mismatch" in reasons[keys[0]]
    assert "truncated" in reasons[keys[1]]
    assert "fingerprint 0101" in reasons[keys[2]]
    report = run_verify(str(tmp_path / "arc"))
    assert not report.intact and {f.key for f in report.failures} == set(keys[:3])


def test_verify_detects_a_replaced_shard_and_measures_quality(ray_cluster, image_folder, tmp_path, lpips_weights):
    run_encode(str(image_folder), str(tmp_path / "arc"), EncodeOptions("jpeg", {"quality": 60}, shard_size=3))
    report = run_verify(str(tmp_path / "arc"), against=str(image_folder), lpips_weights=str(lpips_weights),
                        thresholds=Thresholds(min_psnr=25.0, max_lpips=0.9))
    assert report.intact and report.items == 6 and len(report.quality) == 6
    codec = create_codec("jpeg", {"quality": 60})
    for row in report.quality:  # verify's figures are the metrics of exactly what the codec decodes
        original = np.asarray(Image.open(image_folder / row["key"]).convert("RGB"))
        assert row["psnr"] == pytest.approx(psnr(original, codec.decode(codec.encode([original]))[0]), abs=1e-9)
        assert 0 < row["ms_ssim"] <= 1
    assert all(r["lpips"] is not None for r in report.quality if min(Image.open(image_folder / r["key"]).size) >= 17)
    assert not report.below_threshold
    strict = run_verify(str(tmp_path / "arc"), against=str(image_folder), thresholds=Thresholds(min_psnr=60))
    assert len(strict.below_threshold) == 6
    sampled = run_verify(str(tmp_path / "arc"), against=str(image_folder), fraction=0.5)
    again = run_verify(str(tmp_path / "arc"), against=str(image_folder), fraction=0.5)
    assert [r["key"] for r in sampled.quality] == [r["key"] for r in again.quality]
    assert 0 < len(sampled.quality) < 6

    manifest = require_manifest(Location(str(tmp_path / "arc")))
    shard = tmp_path / "arc" / manifest.shards[1].path
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    report = run_verify(str(tmp_path / "arc"))
    assert not report.intact and any("SHA-256" in p for p in report.problems)


def test_retry_failed_redoes_only_the_failures(ray_cluster, image_folder, tmp_path):
    (image_folder / "late.png").write_bytes(b"not yet an image")
    arc = tmp_path / "arc"
    first = run_encode(str(image_folder), str(arc), EncodeOptions("jpeg", shard_size=4))
    assert first.failed == 1
    Image.fromarray(photo_like(20, 20, seed=9)).save(image_folder / "late.png")
    resumed = run_encode(str(image_folder), str(arc), EncodeOptions("jpeg", shard_size=4))
    assert resumed.encoded == 0 and resumed.totals["failed"] == 1  # a plain re-run leaves failures alone
    retried = run_encode(str(image_folder), str(arc), EncodeOptions("jpeg", shard_size=4, retry_failed=True))
    assert retried.encoded == 1 and retried.totals["failed"] == 0
    keys = archive_keys(arc)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 7


def test_a_plain_rerun_fetches_again_what_could_not_be_fetched(ray_cluster, image_folder, tmp_path):
    listing = tmp_path / "list.txt"
    late, broken = tmp_path / "late.png", tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    listing.write_text("\n".join([str(image_folder / "a.png"), str(late), str(broken)]))
    arc = tmp_path / "arc"
    first = run_encode(str(listing), str(arc), EncodeOptions("jpeg"))
    assert first.encoded == 1 and sorted(failure_stages(arc)) == ["fetch", "load"]
    Image.fromarray(photo_like(20, 20, seed=9)).save(late)  # the storage has it now
    rerun = run_encode(str(listing), str(arc), EncodeOptions("jpeg"))
    assert rerun.encoded == 1 and failure_stages(arc) == ["load"]  # the unloadable image waits for --retry-failed
    assert len(set(archive_keys(arc))) == 2


def failure_stages(arc) -> list[str]:
    archive = Location(str(arc))
    return [failure.stage for failure in read_failures(archive, require_manifest(archive)).values()]


def test_rerun_encodes_only_new_items(ray_cluster, image_folder, tmp_path):
    arc = tmp_path / "arc"
    run_encode(str(image_folder), str(arc), EncodeOptions("avif", shard_size=4))
    Image.fromarray(photo_like(30, 30, seed=11)).save(image_folder / "new.png")
    (image_folder / "README.txt").write_text("not an image name: skipped, not failed")
    summary = run_encode(str(image_folder), str(arc), EncodeOptions("avif", shard_size=4))
    assert (summary.already_done, summary.encoded, summary.skipped_non_images) == (6, 1, 1)
    assert len(summary.workers) == 1  # one new item: one actor, not one per CPU
    assert len(archive_keys(arc)) == 7
    manifest = require_manifest(Location(str(arc)))
    assert manifest.complete and manifest.totals["items"] == 7
    nothing_new = run_encode(str(image_folder), str(arc), EncodeOptions("avif", shard_size=4))
    assert (nothing_new.encoded, nothing_new.workers) == (0, [])  # no actor started for no work


def test_list_file_of_urls_is_a_source(ray_cluster, image_folder, tmp_path):
    listing = tmp_path / "list.txt"
    urls = [f"file://{image_folder / 'a.png'}", str(image_folder / "sub" / "e.jpg"), "# a comment", ""]
    listing.write_text("\n".join(urls + [urls[0]]))  # the same URL twice is one item
    summary = run_encode(str(listing), str(tmp_path / "arc"), EncodeOptions("jpeg"))
    assert summary.encoded == 2
    assert sorted(archive_keys(tmp_path / "arc")) == sorted(
        [str(image_folder / "a.png").lstrip("/"), str(image_folder / "sub" / "e.jpg").lstrip("/")]
    )


def test_a_small_job_is_split_across_all_actors(ray_cluster, image_folder, tmp_path):
    summary = run_encode(str(image_folder), str(tmp_path / "arc"), EncodeOptions("jpeg", shard_size=512))
    manifest = require_manifest(Location(str(tmp_path / "arc")))
    assert [s.rows for s in manifest.shards] == [3, 3]
    assert len(summary.workers) == 2


def read_png(path_or_bytes) -> np.ndarray:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def test_decode_verify_and_cat_give_what_the_standalone_stream_decodes_to(ray_cluster, image_folder, tmp_path):
    model = str(save_tiny_ldm(tmp_path / "model"))
    params = {"model": model, "steps": 3, "codebook": 4, "tile": 2}
    arc = str(tmp_path / "arc")
    # One actor a job: what is tested is the streams, not the split (each actor loads torch and the model).
    run_encode(str(image_folder), arc, EncodeOptions("ddcm", params, shard_size=3, actors=1))
    assert run_decode(arc, str(tmp_path / "out"), model=model, actors=1).decoded == 6
    assert run_verify(arc, against=str(image_folder), model=model, actors=1).intact
    archive = Location(arc)
    manifest = require_manifest(archive)
    for entry in manifest.shards:
        for row in read_shard(archive, entry).to_pylist():
            standalone = cat_item(arc, row["key"], stream=True)  # `diffarc cat --stream`
            header, payload = container.unpack(standalone)
            assert "model" not in header.params and header.fingerprint.hex() == manifest.codec.fingerprint
            # Inside the archive the codec, parameters and fingerprint are the spec table's, not the stream's.
            assert len(row["bitstream"]) == len(payload) + container.COMPACT_OVERHEAD < len(standalone) - 100
            expected = codec_for_header(header, model=model).decode([standalone])[0]
            assert np.array_equal(read_png(tmp_path / "out" / output_name(row["key"], "png")), expected)
            assert np.array_equal(read_png(cat_item(arc, row["key"], model=model)), expected)


def write_format_1_archive(folder, codec, image_folder, keys) -> list[bytes]:
    """An archive as diffarc wrote it before the spec table: full streams whose parameters name the model,
    in one shard, and a format-1 manifest. Returns the streams, in key order."""
    rows = []
    for key in sorted(keys):
        data = (image_folder / key).read_bytes()
        header, payload = container.unpack(codec.encode([load_rgb(data)])[0])
        old = container.Header(codec.name, codec.config, header.fingerprint, header.width, header.height)
        rows.append({"key": key, "bitstream": container.pack(old, payload), "width": header.width,
                     "height": header.height, "source_bytes": len(data),
                     "source_sha256": hashlib.sha256(data).hexdigest(), "codec": codec.name})  # fmt: skip
    for row in rows:
        row["bitstream_bytes"] = len(row["bitstream"])
    shard = "shards/part-0123.parquet"
    (folder / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA_BEFORE_FIDELITY), folder / shard)
    data = (folder / shard).read_bytes()
    entry = {"path": shard, "rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "first_key": rows[0]["key"], "last_key": rows[-1]["key"],
             "source_bytes": sum(r["source_bytes"] for r in rows),
             "bitstream_bytes": sum(r["bitstream_bytes"] for r in rows),
             "pixels": sum(r["width"] * r["height"] for r in rows)}  # fmt: skip
    manifest = {"format": "diffarc-archive", "format_version": 1, "tool_version": "0.1.0",
                "codec": {"name": codec.name, "params": codec.config, "fingerprint": codec.fingerprint.hex()},
                "source": str(image_folder), "complete": True, "created": 1.0, "updated": 2.0, "commits": 1,
                "totals": {}, "shards": [entry], "failures": None}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return [r["bitstream"] for r in rows]


def test_an_archive_of_the_first_format_still_decodes_verifies_and_resumes(ray_cluster, image_folder, tmp_path):
    model = str(save_tiny_ldm(tmp_path / "model"))
    params = {"model": model, "steps": 3, "codebook": 4, "tile": 2}
    codec = create_codec("ddcm", params)
    arc = tmp_path / "arc"
    old_keys = ["a.png", "b.jpg", "c.png"]
    streams = write_format_1_archive(arc, codec, image_folder, old_keys)
    # The model the old params name is a recorded location: looked at when the user trusts it.
    # One actor a job, as in the test above.
    assert run_decode(str(arc), str(tmp_path / "out"), trust_hint=True, actors=1).decoded == 3
    for key, stream in zip(old_keys, streams):
        assert np.array_equal(read_png(tmp_path / "out" / output_name(key, "png")), codec.decode([stream])[0])
    assert cat_item(str(arc), "b.jpg", stream=True) == streams[1]  # an old full stream leaves as it is

    resumed = run_encode(str(image_folder), str(arc), EncodeOptions("ddcm", params, actors=1))
    assert (resumed.already_done, resumed.encoded) == (3, 3)
    assert json.loads((arc / MANIFEST).read_text())["log"] == {"first_commit": 2}  # resuming started the log
    assert require_manifest(Location(str(arc))).codec.hint == {"model": model, "unet": ""}
    assert run_decode(str(arc), str(tmp_path / "all"), model=model, actors=1).decoded == 6
    assert run_verify(str(arc), model=model, actors=1).intact  # old full streams and new compact ones side by side


def test_the_encode_limit_is_recorded_and_decode_and_verify_apply_it(ray_cluster, image_folder, tmp_path):
    arc = tmp_path / "arc"
    first = run_encode(str(image_folder), str(arc), EncodeOptions("jpeg", max_pixels=3000))
    assert first.failed == 2  # a.png (3072 px) and d.png (4096 px) are over the limit
    archive = Location(str(arc))
    assert require_manifest(archive).max_pixels == 2880  # the largest image encoded (sub/e.jpg), not the option
    assert run_decode(str(arc), str(tmp_path / "all")).decoded == 4

    # A stricter limit refuses the larger streams (b.jpg 2560 px, sub/e.jpg 2880 px) before decoding.
    strict = run_decode(str(arc), str(tmp_path / "strict"), max_pixels=1000)
    assert strict.decoded == 2
    assert {(f.key, f.stage) for f in strict.failures} == {("b.jpg", "parse"), ("sub/e.jpg", "parse")}
    assert all("over the limit of 1000" in f.reason for f in strict.failures)
    # ... and so does an archive that says its encoder used that limit, for decode and verify alike.
    manifest = require_manifest(archive)
    manifest.max_pixels = 1000
    archive.write_atomic(MANIFEST, manifest.to_json())
    assert {f.key for f in run_decode(str(arc), str(tmp_path / "by-manifest")).failures} == {"b.jpg", "sub/e.jpg"}
    assert {f.key for f in run_verify(str(arc)).failures} == {"b.jpg", "sub/e.jpg"}
    assert run_verify(str(arc), max_pixels=2880).intact

    # Archives written before the limit was recorded still load, with the default limit.
    document = json.loads((arc / MANIFEST).read_text())
    del document["max_pixels"]
    (arc / MANIFEST).write_text(json.dumps(document))
    assert require_manifest(archive).max_pixels is None
    assert run_decode(str(arc), str(tmp_path / "old")).decoded == 4
    # Resuming with a larger limit records the largest image now in the archive (d.png).
    resumed = run_encode(str(image_folder), str(arc), EncodeOptions("jpeg", max_pixels=5000, retry_failed=True))
    assert resumed.encoded == 2 and require_manifest(archive).max_pixels == 4096


def test_verify_finds_originals_through_a_list_file(ray_cluster, image_folder, tmp_path):
    listing = tmp_path / "list.txt"
    urls = [f"file://{image_folder / 'a.png'}", str(image_folder / "sub" / "e.jpg"), str(image_folder / "c.png")]
    listing.write_text("# originals\n" + "\n".join(urls) + "\n")
    run_encode(str(listing), str(tmp_path / "arc"), EncodeOptions("jpeg", {"quality": 60}))
    report = run_verify(str(tmp_path / "arc"), against=str(listing))
    assert report.intact and len(report.quality) == 3
    codec = create_codec("jpeg", {"quality": 60})
    for row in report.quality:  # each item was compared with its own original
        original = np.asarray(Image.open("/" + row["key"]).convert("RGB"))
        assert row["psnr"] == pytest.approx(psnr(original, codec.decode(codec.encode([original]))[0]), abs=1e-9)
    listing.write_text("\n".join(urls[:2]) + "\n")  # an original the source no longer lists
    partial = run_verify(str(tmp_path / "arc"), against=str(listing))
    assert len(partial.quality) == 2
    assert [(f.key, f.stage) for f in partial.failures] == [(str(image_folder / "c.png").lstrip("/"), "verify")]
    assert "has no" in partial.failures[0].reason


def test_keys_refused_at_listing_are_recorded_and_encoded_once_they_are_fixed(ray_cluster, image_folder, tmp_path):
    (image_folder / "a.jpg").write_bytes((image_folder / "b.jpg").read_bytes())  # a.png and a.jpg: one decoded file
    (image_folder / "back\\slash.png").write_bytes((image_folder / "a.png").read_bytes())
    arc = tmp_path / "arc"
    summary = run_encode(str(image_folder), str(arc), EncodeOptions("jpeg"))
    assert (summary.encoded, summary.refused) == (6, 2)
    archive = Location(str(arc))
    failures = read_failures(archive, require_manifest(archive))
    assert {k: (f.stage, f.reason) for k, f in failures.items()} == {
        "a.png": ("list", "decodes to the same file as 'a.jpg' (the keys differ only in their extension); rename one of them"),
        "back\\slash.png": ("list", "key has a backslash: it cannot name a decoded file"),
    }
    # The backslash file renamed: a plain re-run encodes it; a.png still may not join a.jpg, archived.
    (image_folder / "back\\slash.png").rename(image_folder / "slash.png")
    (image_folder / "a.jpg").rename(image_folder / "a2.jpg")
    again = run_encode(str(image_folder), str(arc), EncodeOptions("jpeg"))
    assert again.encoded == 2  # slash.png and a2.jpg
    assert set(read_failures(archive, require_manifest(archive))) == {"a.png"}
    assert sorted(archive_keys(arc)) == ["a.jpg", "a2.jpg", "b.jpg", "c.png", "d.png", "slash.png", "sub/e.jpg", "sub/f.png"]
    assert run_decode(str(arc), str(tmp_path / "out")).decoded == 8 and run_verify(str(arc)).intact
