import hashlib
import io
import json
import re
import threading
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diffarc.pipeline.archive import (
    LAST_CHECKPOINT,
    MANIFEST,
    ArchiveError,
    ArchiveWriter,
    CodecSpec,
    EncodedItem,
    Failure,
    checkpoint_path,
    commit_path,
    load_manifest,
    read_failures,
    read_shard,
    write_shard,
)
from diffarc.pipeline.storage import Location
from diffarc.codecs import container
from diffarc.codecs.errors import BitstreamError

SPEC = CodecSpec("jpeg", {"quality": 75}, "")


def items(keys, size=100):
    """Items whose streams are full containers of SPEC, each `size` bytes long once compacted."""
    header = container.Header(SPEC.name, SPEC.params, b"", width=8, height=4)
    payload_bytes = size - container.COMPACT_OVERHEAD
    return [
        EncodedItem(k, container.pack(header, bytes([i % 256]) * payload_bytes), 8, 4, 1000, "0" * 64)
        for i, k in enumerate(keys)
    ]


def test_shard_is_plain_parquet_with_sorted_keys_and_bounded_row_groups(tmp_path):
    archive = Location(str(tmp_path))
    entry = write_shard(archive, items([f"k{i:03d}" for i in reversed(range(50))], size=1000), SPEC, row_group_bytes=4000)
    parquet = pq.ParquetFile(tmp_path / entry.path)
    assert parquet.metadata.num_rows == entry.rows == 50
    assert parquet.metadata.num_row_groups == 13  # 4 bitstreams of 1000 bytes per 4000-byte group
    assert parquet.read().column("key").to_pylist() == sorted(f"k{i:03d}" for i in range(50))
    assert json.loads(parquet.schema_arrow.metadata[b"diffarc.codec"])["name"] == "jpeg"
    column = parquet.metadata.row_group(0).column(1)
    assert column.path_in_schema == "bitstream" and column.compression == "UNCOMPRESSED"
    assert (entry.first_key, entry.last_key) == ("k000", "k049")


def test_reading_one_key_touches_only_its_row_group(tmp_path):
    archive = Location(str(tmp_path))
    entry = write_shard(archive, items([f"k{i:03d}" for i in range(40)], size=1000), SPEC, row_group_bytes=2000)
    table = read_shard(archive, entry, columns=["key", "bitstream"], keys=["k017"])
    assert table.column("key").to_pylist() == ["k017"]


def test_writer_resumes_and_never_commits_a_key_twice(tmp_path):
    archive = Location(str(tmp_path))
    writer = ArchiveWriter(archive, SPEC, source="src")
    writer.commit(write_shard(archive, items(["a", "b"]), SPEC), ["a", "b"], [Failure("c", "load", "broken")])
    writer.close()  # as a killed job's would be
    resumed = ArchiveWriter(archive, SPEC, source="src")
    assert resumed.done == {"a", "b"} and set(resumed.failures) == {"c"}
    with pytest.raises(ArchiveError, match="repeats committed keys"):
        resumed.commit(write_shard(archive, items(["b"]), SPEC), ["b"], [])
    # A retried failure that now succeeds leaves the failure table.
    resumed.commit(write_shard(archive, items(["c"]), SPEC), ["c"], [])
    manifest = resumed.finish()
    assert manifest.complete and manifest.totals["items"] == 3 and manifest.failures is None


def test_finish_removes_shards_no_manifest_lists(tmp_path):
    archive = Location(str(tmp_path))
    writer = ArchiveWriter(archive, SPEC, source="src")
    orphan = write_shard(archive, items(["x"]), SPEC)  # written, then the job was "killed" before commit
    writer.commit(write_shard(archive, items(["a"]), SPEC), ["a"], [])
    writer.finish()
    assert not (tmp_path / orphan.path).exists()
    assert len(list((tmp_path / "shards").iterdir())) == 1


def test_resume_with_other_codec_settings_is_refused(tmp_path):
    archive = Location(str(tmp_path))
    ArchiveWriter(archive, SPEC, source="src").finish()
    with pytest.raises(ArchiveError, match="was encoded with jpeg quality=75; this job asks for jpeg quality=50: resume with the same codec"):
        ArchiveWriter(archive, CodecSpec("jpeg", {"quality": 50}, ""), source="src")


def test_newer_or_foreign_manifests_are_refused(tmp_path):
    archive = Location(str(tmp_path))
    ArchiveWriter(archive, SPEC, source="src").finish()
    document = json.loads((tmp_path / MANIFEST).read_text())
    document["format_version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(document))
    with pytest.raises(ArchiveError, match="newer"):
        load_manifest(archive)
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(ArchiveError, match="not a diffarc archive"):
        load_manifest(archive)


# ---------------------------------------------------------------- spec table, compact streams, old archives


def test_shards_hold_compact_streams_that_the_manifest_expands(tmp_path):
    archive = Location(str(tmp_path))
    writer = ArchiveWriter(archive, SPEC, source="src")
    written = items(["a", "b"], size=300)
    entry = write_shard(archive, written, writer.manifest.codec)
    writer.commit(entry, ["a", "b"], [])
    manifest = load_manifest(archive)
    commit = json.loads((tmp_path / commit_path(1)).read_text())
    assert commit["format_version"] == 3
    assert commit["set"]["specs"] == [{"name": "jpeg", "params": {"quality": 75}, "fingerprint": "", "id": 1, "hint": {}}]
    rows = read_shard(archive, entry).to_pylist()
    assert [len(r["bitstream"]) for r in rows] == [r["bitstream_bytes"] for r in rows] == [300, 300]
    assert entry.bitstream_bytes == 600
    assert [manifest.expand(r["bitstream"]) for r in rows] == [i.bitstream for i in written]


def test_a_stream_of_another_spec_is_never_written(tmp_path):
    other = CodecSpec("jpeg", {"quality": 10}, "")
    with pytest.raises(BitstreamError, match="spec 1 is jpeg"):
        write_shard(Location(str(tmp_path)), items(["a"]), other)


def write_format_1_manifest(folder, codec: dict, shards=()):
    """A manifest as diffarc wrote it before the spec table: one "codec", its params holding the model."""
    document = {
        "format": "diffarc-archive", "format_version": 1, "tool_version": "0.1.0", "codec": codec,
        "source": "src", "complete": True, "created": 1.0, "updated": 2.0, "commits": 1, "totals": {},
        "shards": list(shards), "failures": None,
    }  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(document))


def test_a_format_1_manifest_reads_with_its_model_as_a_hint(tmp_path):
    write_format_1_manifest(tmp_path, {"name": "ddcm", "params": {"model": "/old/place", "steps": 12}, "fingerprint": "ab"})
    manifest = load_manifest(Location(str(tmp_path)))
    assert manifest.codec == CodecSpec("ddcm", {"steps": 12}, "ab")
    assert manifest.codec.hint == {"model": "/old/place"} and manifest.models == []


def test_resuming_accepts_the_same_weights_found_elsewhere_and_refuses_others(tmp_path):
    archive = Location(str(tmp_path))
    ArchiveWriter(archive, CodecSpec("ddcm", {"steps": 12}, "ab", hint={"model": "/a"}), source="src").finish()
    moved = ArchiveWriter(archive, CodecSpec("ddcm", {"steps": 12}, "ab", hint={"model": "/b"}), source="src")
    moved.finish()
    assert load_manifest(archive).codec.hint == {"model": "/b"}  # where the weights are now
    with pytest.raises(ArchiveError, match="weights cdcd.*resume with the same codec, parameters and weights"):
        ArchiveWriter(archive, CodecSpec("ddcm", {"steps": 12}, "cd" * 32, hint={"model": "/b"}), source="src")


# ---------------------------------------------------------------- embedded weights (models/)


def test_embedded_weights_are_whole_before_the_manifest_names_them_and_checked_by_verify(tmp_path):
    from diffarc.codecs.latent_denoise.codec import PREDICTORS_FOLDER
    from diffarc.codecs.registry import create_codec
    from diffarc.pipeline.archive import check_embedded_weights, embed_weights

    from ..codecs.test_latent_denoise import save_predictors
    from ..conftest import save_tiny_ldm

    model = save_tiny_ldm(tmp_path / "model")
    (model / "text_encoder").mkdir()  # what a Stable Diffusion folder holds beside what the codec reads
    (model / "text_encoder" / "model.safetensors").write_bytes(b"not needed")
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant nobody loads")
    predictors = save_predictors(tmp_path / "predictors")
    codec = create_codec("latent-denoise", {"model": str(model), "predictors": str(predictors)})
    fingerprint = codec.fingerprint.hex()
    archive = Location(str(tmp_path / "arc"))
    spec = CodecSpec(codec.name, codec.stream_params, fingerprint, hint=codec.locations)
    writer = ArchiveWriter(archive, spec, source="src")
    (tmp_path / "arc" / "models" / fingerprint / "vae").mkdir(parents=True)  # a killed run's partial copy
    (tmp_path / "arc" / "models" / fingerprint / "vae" / "half.safetensors").write_bytes(b"...")
    # Files this archive's writer cannot prove it wrote (another fingerprint's folder, a name it never
    # gives) are left alone.
    (tmp_path / "arc" / "models" / ("ee" * 32)).mkdir(parents=True)
    (tmp_path / "arc" / "models" / ("ee" * 32) / "half.safetensors").write_bytes(b"...")
    (tmp_path / "arc" / "models" / fingerprint / "notes.txt").write_bytes(b"mine")

    embedded = embed_weights(archive, codec)
    assert load_manifest(archive) is None  # files first; a manifest names them only once committed
    writer.add_model(embedded)
    listed = [f["path"] for f in load_manifest(archive).models[0].files]
    assert listed == [
        f"{PREDICTORS_FOLDER}/config.json", f"{PREDICTORS_FOLDER}/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    writer.finish()
    assert sorted(archive.list_files("models")) == sorted(
        [f"models/{'ee' * 32}/half.safetensors", f"models/{fingerprint}/notes.txt"]
        + [f"models/{fingerprint}/{p}" for p in listed]
    )
    manifest = load_manifest(archive)
    assert manifest.totals["model_bytes"] == sum(f["bytes"] for f in manifest.models[0].files) > 0
    assert check_embedded_weights(archive, manifest) == []

    # Files whose checksums are right but whose weights are not the fingerprint's (a forged listing).
    other = save_predictors(tmp_path / "other-predictors", seed=1)
    weights = tmp_path / "arc" / "models" / fingerprint / PREDICTORS_FOLDER / "diffusion_pytorch_model.safetensors"
    weights.write_bytes((other / "diffusion_pytorch_model.safetensors").read_bytes())
    forged = manifest.models[0].files[1]
    forged["bytes"], forged["sha256"] = weights.stat().st_size, hashlib.sha256(weights.read_bytes()).hexdigest()
    assert check_embedded_weights(archive, manifest) == [
        f"models/{fingerprint}: the weights' fingerprint is "
        f"{create_codec('latent-denoise', {'model': str(model), 'predictors': str(other)}).fingerprint.hex()}, "
        "not the one the folder is named by"
    ]
    weights.unlink()
    assert check_embedded_weights(archive, manifest) == [
        f"models/{fingerprint}/{PREDICTORS_FOLDER}/diffusion_pytorch_model.safetensors: listed in the manifest but missing"
    ]


# ---------------------------------------------------------------- hostile manifests, one writer


def committed_archive(tmp_path, failures=("c",)):
    archive = Location(str(tmp_path / "arc"))
    writer = ArchiveWriter(archive, SPEC, source="src")
    writer.commit(write_shard(archive, items(["a", "b"]), SPEC), ["a", "b"], [Failure(k, "load", "bad") for k in failures])
    writer.finish()
    return archive


def as_whole_manifest(folder: Path) -> Path:
    """Rewrite an archive's manifest.json as its whole manifest, as archives without a log hold it (a
    checkpoint's document), for tests that edit a manifest by hand; returns its path."""
    (folder / MANIFEST).write_bytes(load_manifest(Location(str(folder))).to_json())
    return folder / MANIFEST


def edit_manifest(archive, edit) -> None:
    path = as_whole_manifest(Path(archive.url))
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("field, value, message", [
    ("shards.0.path", "../other.arc/shards/part-1.parquet", "shards[0].path is not a path inside the archive"),
    ("shards.0.path", "/etc/hostname", "shards[0].path is not a path inside the archive"),
    ("shards.0.path", "models/x.parquet", "shards[0].path is not a path inside the archive"),
    ("failures.path", "../victim/failures-000001.parquet", "failures.path is not a path inside the archive"),
    ("models", [{"fingerprint": "ab", "files": [{"path": "../../x", "bytes": 1, "sha256": "0" * 64}]}],
     "models[0].files[0].path is not a path inside the archive"),
    ("shards.0.rows", "2", "shards[0].rows must be a whole number"),
    ("shards.0.rows", True, "shards[0].rows must be a whole number"),
    ("shards.0.rows", -1, "shards[0].rows must be a whole number"),
    ("shards.0.rows", 2.0, "shards[0].rows must be a whole number"),
    ("shards.0.bytes", 2**70, "shards[0].bytes must be a whole number"),
    ("shards.0.sha256", "not hex", "shards[0].sha256 is not a valid value"),
    ("shards.0.first_key", "zzz", "shards[0].first_key comes after last_key"),
    ("shards", {"path": "x"}, "shards must be a list"),
    ("shards.1", None, "shards[1] must be an object"),
    ("format_version", "2", "format_version must be a whole number"),
    ("format_version", [2], "format_version must be a whole number"),
    ("specs.0.id", 70000, "specs[0].id must be at most 65535"),
    ("specs.0.params", [], "specs[0].params must be an object"),
    ("specs.0.fingerprint", "xyz", "specs[0].fingerprint is not a valid value"),
    ("complete", "yes", "complete must be true or false"),
    ("max_pixels", 0, "max_pixels must be a whole number from 1"),
    ("commits", None, "commits is missing"),
])  # fmt: skip
def test_a_manifest_field_of_the_wrong_type_range_or_place_is_refused_by_name(tmp_path, field, value, message):
    archive = committed_archive(tmp_path)

    def edit(document):
        *parents, last = field.split(".")
        target = document
        for name in parents:
            target = target[int(name)] if name.isdigit() else target[name]
        if last.isdigit():
            target.append(value)
        else:
            target[last] = value

    edit_manifest(archive, edit)
    with pytest.raises(ArchiveError, match=re.escape(f"manifest field {message}")):
        load_manifest(archive)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity"])
def test_numbers_json_cannot_hold_are_refused(tmp_path, number):
    archive = committed_archive(tmp_path)
    path = as_whole_manifest(tmp_path / "arc")
    path.write_text(re.sub(r'"rows": \d+', f'"rows": {number}', path.read_text(), count=1))
    with pytest.raises(ArchiveError, match="manifest is not valid JSON"):
        load_manifest(archive)


def test_a_failure_table_path_outside_the_archive_deletes_nothing_on_a_rerun(tmp_path):
    archive = committed_archive(tmp_path)
    victim = tmp_path / "victim" / "failures-000001.parquet"
    victim.parent.mkdir()
    victim.write_bytes((tmp_path / "arc" / load_manifest(archive).failures["path"]).read_bytes())
    edit_manifest(archive, lambda d: d["failures"].update(path="../victim/failures-000001.parquet"))
    with pytest.raises(ArchiveError, match="failures.path is not a path inside the archive"):
        writer = ArchiveWriter(archive, SPEC, source="src")  # a plain re-run of encode
        writer.commit(None, [], [Failure("d", "load", "bad")])
    assert victim.exists()


@pytest.fixture(params=["local", "s3"])
def any_archive(request, tmp_path) -> Location:
    """An empty archive folder on local disk, or on the real S3 server (moto)."""
    if request.param == "local":
        return Location(str(tmp_path / "arc"))
    import s3fs

    options = request.getfixturevalue("s3_server")["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    if not fs.exists("races"):
        fs.mkdir("races")
    return Location(f"s3://races/{uuid.uuid4().hex}", options)


@pytest.mark.parametrize("earlier_commits", [0, 1])
def test_two_writers_racing_for_one_commit_number_one_wins_and_the_other_stops(any_archive, earlier_commits):
    archive = any_archive
    first = ArchiveWriter(archive, SPEC, source="src")
    for number in range(earlier_commits):
        first.commit(write_shard(archive, items([f"a{number}"]), SPEC), [f"a{number}"], [])
    # A second writer past the lease (one whose lease expired unseen) read the same state, and both commit
    # the next number at the same moment: the store lets exactly one create it.
    second = ArchiveWriter(archive, SPEC, source="src", lease=first.lease)
    shards = {first: write_shard(archive, items(["x"]), SPEC), second: write_shard(archive, items(["y"]), SPEC)}
    start, refused = threading.Barrier(2), []

    def commit(writer):
        start.wait()
        try:
            writer.commit(shards[writer], [shards[writer].first_key], [])
        except ArchiveError as exc:
            refused.append((writer, str(exc)))

    threads = [threading.Thread(target=commit, args=(w,)) for w in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(refused) == 1 and "another writer committed since this job read the archive" in refused[0][1]
    winner = first if refused[0][0] is second else second
    manifest = load_manifest(archive)
    assert manifest.commits == earlier_commits + 1
    assert [e.path for e in manifest.shards][-1] == shards[winner].path and len(manifest.shards) == earlier_commits + 1
    winner.finish()
    assert load_manifest(archive).complete and len(load_manifest(archive).shards) == earlier_commits + 1


def test_a_failure_table_replaced_since_a_reader_loaded_its_manifest_is_read_through_the_new_one(tmp_path):
    archive = Location(str(tmp_path / "arc"))
    writer = ArchiveWriter(archive, SPEC, source="src")
    writer.commit(None, [], [Failure("x", "load", "bad")])
    old = load_manifest(archive)  # a reader (info, verify) loads the manifest ...
    writer.commit(None, [], [Failure("y", "load", "bad")])  # ... the encode commits, deleting that table
    writer.finish()
    assert not archive.exists(old.failures["path"])
    assert set(read_failures(archive, old)) == {"x", "y"}


def test_a_truncated_damaged_or_foreign_shard_is_refused_by_name(tmp_path):
    archive = committed_archive(tmp_path)
    entry = load_manifest(archive).shards[0]
    shard = tmp_path / "arc" / entry.path
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    for whole in (False, True):
        with pytest.raises(ArchiveError, match=f"{entry.path}: .*(truncated or replaced|damaged or replaced)"):
            read_shard(archive, entry, columns=["key"], whole=whole)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off: the SHA-256 tells
    with pytest.raises(ArchiveError, match="SHA-256 differs"):
        read_shard(archive, entry, whole=True)
    # A file with the manifest's size and checksum (a hostile manifest) that is no shard of this format.
    table = pq.read_table(io.BytesIO(data)).drop_columns(["codec"])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    shard.write_bytes(buffer.getvalue())
    entry.bytes, entry.sha256 = len(buffer.getvalue()), hashlib.sha256(buffer.getvalue()).hexdigest()
    with pytest.raises(ArchiveError, match="schema differs from the archive format"):
        read_shard(archive, entry, whole=True)
    shard.unlink()
    with pytest.raises(ArchiveError, match="listed in the manifest but missing"):
        read_shard(archive, entry)


def test_an_archive_written_before_the_lock_and_checked_reads_resumes_as_it_is(tmp_path):
    # Format 2 as the previous diffarc left it: failure tables named by commit number only, no lock file.
    archive = committed_archive(tmp_path)
    document = json.loads(as_whole_manifest(tmp_path / "arc").read_text())
    old_name = "failures/failures-000001.parquet"
    (tmp_path / "arc" / document["failures"]["path"]).rename(tmp_path / "arc" / old_name)
    document["failures"]["path"] = old_name
    document["format_version"] = 2
    del document["max_pixels"]
    (tmp_path / "arc" / MANIFEST).write_text(json.dumps(document))
    writer = ArchiveWriter(archive, SPEC, source="src")
    assert writer.done == {"a", "b"} and set(writer.failures) == {"c"}
    writer.commit(write_shard(archive, items(["d"]), SPEC), ["d"], [])
    writer.finish()
    manifest = load_manifest(archive)
    assert manifest.totals["items"] == 3 and set(read_failures(archive, manifest)) == {"c"}
    assert archive.list_files("failures") == [manifest.failures["path"]] == [old_name]  # unchanged: kept


# ---------------------------------------------------------------- the commit log


def log_files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "_log").iterdir())


def test_a_commit_is_one_small_file_whatever_the_archive_holds(tmp_path):
    archive = Location(str(tmp_path))
    writer = ArchiveWriter(archive, SPEC, source="src", checkpoint_every=10)
    writer.commit(write_shard(archive, items(["k000"]), SPEC), ["k000"], [])
    pointer = (tmp_path / MANIFEST).read_bytes()
    assert json.loads(pointer) == {"format": "diffarc-archive", "format_version": 3, "log": {"first_commit": 1}}
    for index in range(1, 25):
        key = f"k{index:03d}"
        writer.commit(write_shard(archive, items([key]), SPEC), [key], [])
    sizes = [(tmp_path / commit_path(n)).stat().st_size for n in range(2, 26)]
    assert max(sizes) - min(sizes) < 20 and max(sizes) < 1000  # the 24th shard's commit costs what the 1st's did
    assert (tmp_path / MANIFEST).read_bytes() == pointer  # written once
    assert log_files(tmp_path) == sorted([*[f"{n:020d}.checkpoint.json" for n in (10, 20)], "_last_checkpoint.json",
                                          *[f"{n:020d}.json" for n in range(1, 26)],
                                          "shards-000000000000-000000000010.json", "shards-000000000000-000000000020.json"])  # fmt: skip
    writer.finish()  # checkpoints the end; only the newest two are kept, with the parts they name
    assert [n for n in log_files(tmp_path) if n.endswith(".checkpoint.json")] == [f"{n:020d}.checkpoint.json" for n in (20, 26)]
    assert [n for n in log_files(tmp_path) if n.startswith("shards-")] == [
        "shards-000000000000-000000000020.json", "shards-000000000000-000000000025.json"]  # fmt: skip
    manifest = load_manifest(archive)
    assert manifest.complete and manifest.commits == 26 and [e.first_key for e in manifest.shards] == [
        f"k{i:03d}" for i in range(25)]  # fmt: skip


def test_a_reader_starts_at_the_newest_checkpoint_and_passes_over_one_it_cannot_trust(tmp_path):
    archive = Location(str(tmp_path))
    writer = ArchiveWriter(archive, SPEC, source="src", checkpoint_every=4)
    for index in range(10):
        writer.commit(write_shard(archive, items([f"k{index}"]), SPEC), [f"k{index}"], [Failure(f"f{index}", "load", "bad")])
    writer.close()  # killed after commit 10: checkpoints 4 and 8, commits 9 and 10 after them
    expected = load_manifest(archive)
    assert (len(expected.shards), expected.commits, expected.complete) == (10, 10, False)
    assert json.loads((tmp_path / LAST_CHECKPOINT).read_text())["commit"] == 8

    def same(manifest):
        return (manifest.header(), manifest.shards, manifest.commits) == (expected.header(), expected.shards, 10)

    # A checkpoint is a shortcut: with none, the log is replayed from its first commit.
    (tmp_path / commit_path(3)).rename(tmp_path / "aside")  # (prove the checkpoint is what is read)
    assert same(load_manifest(archive))
    (tmp_path / "aside").rename(tmp_path / commit_path(3))
    checkpoint = tmp_path / checkpoint_path(8)
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])  # half-written (a store without atomic writes)
    assert same(load_manifest(archive))
    checkpoint.write_bytes(whole.replace(b'"complete": false', b'"complete": true '))  # same size, other bytes
    assert same(load_manifest(archive))
    checkpoint.unlink()
    assert same(load_manifest(archive))
    (tmp_path / LAST_CHECKPOINT).write_text("{not json")
    assert same(load_manifest(archive))
    (tmp_path / LAST_CHECKPOINT).unlink()
    assert same(load_manifest(archive))
    # A resumed writer goes on from the replayed state.
    resumed = ArchiveWriter(archive, SPEC, source="src", checkpoint_every=4)
    assert len(resumed.done) == 10 and len(resumed.failures) == 10
    resumed.commit(write_shard(archive, items(["f0"]), SPEC), ["f0"], [])
    assert resumed.finish().commits == 12
    manifest = load_manifest(archive)
    assert len(manifest.shards) == 11 and set(read_failures(archive, manifest)) == {f"f{i}" for i in range(1, 10)}


def test_a_checkpoint_writes_only_the_parts_of_its_shard_list_that_are_new(tmp_path):
    """Parts are aligned runs of 2·2^k entries (part_shards=2) plus a tail: a checkpoint after every commit
    rewrites the tail and, when the count crosses a boundary, one merged run; never a whole part again."""
    archive = Location(str(tmp_path))
    writer = ArchiveWriter(archive, SPEC, source="src", checkpoint_every=1, part_shards=2)
    written = {}  # part → its file's identity when first seen
    for index in range(11):
        writer.commit(write_shard(archive, items([f"k{index:02d}"]), SPEC), [f"k{index:02d}"], [])
        for name in log_files(tmp_path):
            if name.startswith("shards-"):
                stat = (tmp_path / "_log" / name).stat()
                assert written.setdefault(name, (stat.st_ino, stat.st_mtime_ns)) == (stat.st_ino, stat.st_mtime_ns)
    checkpoint = json.loads((tmp_path / checkpoint_path(11)).read_text())
    assert "shards" not in checkpoint
    assert [(p["start"], p["end"]) for p in checkpoint["shard_parts"]] == [(0, 8), (8, 10), (10, 11)]
    # Eleven checkpoints wrote 1 + 2 + 1 + 4 + 1 + 2 + 1 + 8 + … entries, not 1 + 2 + … + 11:
    assert sum(int(n[20:32]) - int(n[7:19]) for n in written) == 24 < sum(range(1, 12))
    manifest = load_manifest(archive)
    assert [e.first_key for e in manifest.shards] == [f"k{i:02d}" for i in range(11)]

    # A part that is not what its checkpoint says is passed over, as a damaged checkpoint is: the log is read.
    (tmp_path / commit_path(2)).rename(tmp_path / "aside")  # (prove the checkpoint is what is read)
    assert load_manifest(archive).shards == manifest.shards
    (tmp_path / "aside").rename(tmp_path / commit_path(2))
    part = tmp_path / "_log" / "shards-000000000000-000000000008.json"
    part.write_bytes(part.read_bytes().replace(b"k03", b"k3x"))  # trusted, it would rename a shard's first key
    assert load_manifest(archive).shards == manifest.shards
    part.unlink()
    assert load_manifest(archive).shards == manifest.shards
    writer.finish()
    assert load_manifest(archive).shards == manifest.shards and load_manifest(archive).complete


def test_a_single_manifest_archive_reads_as_it_is_and_resuming_it_starts_a_log(tmp_path):
    # Format 2 as diffarc wrote it before the log: one whole manifest.json, rewritten at each commit.
    archive = committed_archive(tmp_path)
    old = json.loads(as_whole_manifest(tmp_path / "arc").read_text())
    old.update(format_version=2, commits=7, complete=False)
    (tmp_path / "arc" / MANIFEST).write_text(json.dumps(old, indent=1))
    for path in (tmp_path / "arc" / "_log").iterdir():
        path.unlink()
    assert [e.first_key for e in load_manifest(archive).shards] == ["a"] and load_manifest(archive).commits == 7
    # A run that was killed after the log's first commit, before manifest.json named it: the old archive stands.
    (tmp_path / "arc" / commit_path(8)).write_text('{"format": "diffarc-archive-commit", "half": ')
    assert load_manifest(archive).commits == 7
    writer = ArchiveWriter(archive, SPEC, source="src")
    assert writer.done == {"a", "b"}
    writer.commit(write_shard(archive, items(["d"]), SPEC), ["d"], [])
    assert json.loads((tmp_path / "arc" / MANIFEST).read_text())["log"] == {"first_commit": 9}
    first = json.loads((tmp_path / "arc" / commit_path(9)).read_text())
    assert [s["first_key"] for s in first["add_shards"]] == ["a", "d"]  # the old manifest, then this commit
    writer.finish()
    manifest = load_manifest(archive)
    assert manifest.complete and manifest.commits == 10 and manifest.totals["items"] == 3
    assert set(read_failures(archive, manifest)) == {"c"}
    assert not (tmp_path / "arc" / commit_path(8)).exists()  # the killed run's leftover, removed at the end


def test_a_diffarc_before_the_log_refuses_a_log_archive_as_newer(tmp_path):
    committed_archive(tmp_path)
    document = json.loads((tmp_path / "arc" / MANIFEST).read_text())
    assert document["format_version"] > 2 and "shards" not in document  # what a format-2 reader checks first


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["add_shards"][0].update(path="../other.arc/shards/part-1.parquet"),
     "add_shards[0].path is not a path inside the archive"),
    (lambda c: c["add_shards"][0].update(rows=True), "add_shards[0].rows must be a whole number"),
    (lambda c: c.update(commit=5), "commit is not the number in the file's name"),
    (lambda c: c["set"].update(shards=[]), "set.shards is not a field a commit can set"),
    (lambda c: c["set"].pop("specs"), "set.specs is missing"),  # the first commit must say everything
    (lambda c: c["set"].update(failures={"path": "/etc/hostname", "rows": 1, "bytes": 9, "sha256": "0" * 64}),
     "set.failures.path is not a path inside the archive"),
    (lambda c: c.update(format_version=9), "archive format version 9 is newer"),
])  # fmt: skip
def test_a_commit_file_with_a_bad_field_is_refused_naming_the_file_and_field(tmp_path, edit, message):
    archive = committed_archive(tmp_path)
    (tmp_path / "arc" / "_log" / "_last_checkpoint.json").unlink()  # read the commits themselves
    path = tmp_path / "arc" / commit_path(1)
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(ArchiveError, match=re.escape(f"{commit_path(1)}: ") + ".*" + re.escape(message)):
        load_manifest(archive)


def test_a_shard_committed_twice_in_the_log_is_refused(tmp_path):
    archive = committed_archive(tmp_path)
    (tmp_path / "arc" / "_log" / "_last_checkpoint.json").unlink()
    first = json.loads((tmp_path / "arc" / commit_path(1)).read_text())
    second_path = tmp_path / "arc" / commit_path(2)
    second = json.loads(second_path.read_text())
    second["add_shards"] = first["add_shards"]
    second_path.write_text(json.dumps(second))
    with pytest.raises(ArchiveError, match=re.escape(f"{commit_path(2)}: manifest field add_shards[0].path repeats")):
        load_manifest(archive)


def test_a_writer_keeps_out_every_key_decode_could_not_give_back(tmp_path):
    archive = Location(str(tmp_path))
    writer = ArchiveWriter(archive, SPEC, source="src")
    writer.commit(write_shard(archive, items(["a.jpg", "sub.png"]), SPEC), ["a.jpg", "sub.png"], [])
    keys = ["../up.png", "a.png", "b.png", "sub.png/x.png"]
    first = write_shard(archive, items(keys), SPEC)
    writer.commit(first, keys, [])
    manifest = writer.finish()
    assert not (tmp_path / first.path).exists()  # written again without the refused rows
    assert read_shard(archive, manifest.shards[1]).column("key").to_pylist() == ["b.png"]
    assert {k: f.stage for k, f in read_failures(archive, manifest).items()} == {
        "../up.png": "list", "a.png": "list", "sub.png/x.png": "list"}
    reasons = {k: f.reason for k, f in read_failures(archive, manifest).items()}
    assert reasons["a.png"].startswith("decodes to the same file as 'a.jpg'")
    assert reasons["sub.png/x.png"].startswith("needs the folder sub.png, the file 'sub.png' decodes to")
    assert reasons["../up.png"] == "key has an empty, '.' or '..' component: it cannot name a decoded file"


def test_a_reader_opens_once_parses_each_stream_once_and_travels_without_its_shard_list(tmp_path):
    import pickle

    from diffarc.pipeline.archive import ArchiveReader

    archive = Location(str(tmp_path))
    writer = ArchiveWriter(archive, SPEC, source="src")
    written = items(["a", "b", "c"], size=200)
    entry = write_shard(archive, written, writer.manifest.codec)
    writer.commit(entry, ["a", "b", "c"], [Failure("d", "load", "broken")])
    writer.finish()
    reader = ArchiveReader.open(str(tmp_path))
    found = reader.streams(reader.shards[0], keys=["b", "c"])
    assert found.keys == ["b", "c"] and not found.failures
    assert [container.pack(*stream) for stream in found.streams] == [i.bitstream for i in written[1:]]
    assert set(reader.failures()) == {"d"} and reader.pixel_limit() == 32 and reader.pixel_limit(10) == 10
    travelled = pickle.loads(pickle.dumps(reader))
    assert travelled.shards == [] and len(pickle.dumps(travelled)) < len(pickle.dumps(reader.manifest))
    assert travelled.streams(entry).keys == ["a", "b", "c"]  # a worker is handed the entries it reads
    (tmp_path / entry.path).write_bytes((tmp_path / entry.path).read_bytes()[:-1] + b"\x00")
    with pytest.raises(ArchiveError, match="size or SHA-256 differs"):
        reader.streams(entry)
