import json

import pyarrow.parquet as pq
import pytest

from diffarc.pipeline.archive import (
    MANIFEST,
    ArchiveError,
    ArchiveWriter,
    CodecSpec,
    EncodedItem,
    Failure,
    load_manifest,
    read_shard,
    write_shard,
)
from diffarc.pipeline.storage import Location
from diffarc.codecs import container

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
    with pytest.raises(ArchiveError, match="Resume with the same codec"):
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
