"""Archives edited by someone hostile, or damaged: nothing outside the archive is read or written, what the
manifest claims is checked, one bad shard costs only itself, and verify never calls a poisoned archive INTACT.
Real jpeg streams in real Parquet shards, decoded on a real local Ray."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from diffarc.codecs import container
from diffarc.codecs.errors import ArchiveError
from diffarc.codecs.registry import create_codec
from diffarc.jobs.cli import main
from diffarc.jobs.options import EXIT_ITEMS_FAILED
from diffarc.pipeline.archive import MANIFEST, ArchiveWriter, CodecSpec, EncodedItem, load_manifest, write_shard
from diffarc.pipeline.decode import run_decode
from diffarc.pipeline.info import archive_info
from diffarc.pipeline.storage import Location
from diffarc.pipeline.verify import run_verify

from ..conftest import photo_like
from .test_archive import as_whole_manifest

pytestmark = pytest.mark.slow

CODEC = create_codec("jpeg")
SPEC = CodecSpec("jpeg", CODEC.config, "")


def write_archive(path, shards: list[list[str]], streams: dict[str, bytes] | None = None) -> Location:
    """An archive of real jpeg streams, one shard per list of keys; `streams` replaces some keys' streams."""
    archive = Location(str(path))
    writer = ArchiveWriter(archive, SPEC, source="images")
    for number, keys in enumerate(shards):
        images = [photo_like(16, 24, seed=10 * number + i) for i in range(len(keys))]
        encoded = CODEC.encode(images)
        items = [EncodedItem(k, (streams or {}).get(k, s), 24, 16, 1000, "0" * 64) for k, s in zip(keys, encoded)]
        writer.commit(write_shard(archive, items, SPEC), keys, [])
    writer.finish()
    return archive


def edit_manifest(path, edit) -> None:
    document = json.loads(as_whole_manifest(path).read_text())
    edit(document)
    (path / MANIFEST).write_text(json.dumps(document))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_shard_path_into_another_archive_is_refused_before_anything_is_read(ray_cluster, tmp_path):
    write_archive(tmp_path / "mine.arc", [["a.png"]])
    other = write_archive(tmp_path / "other.arc", [["secret1.png", "secret2.png"]])
    stolen = json.loads(as_whole_manifest(tmp_path / "other.arc").read_text())["shards"][0]
    edit_manifest(tmp_path / "mine.arc", lambda d: d["shards"].append({**stolen, "path": f"../other.arc/{stolen['path']}"}))
    with pytest.raises(ArchiveError, match=r"shards\[1\].path is not a path inside the archive"):
        run_verify(str(tmp_path / "mine.arc"))
    with pytest.raises(ArchiveError, match=r"shards\[1\].path is not a path inside the archive"):
        run_decode(str(tmp_path / "mine.arc"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert load_manifest(other).totals["items"] == 2


def test_edited_row_counts_are_not_believed(ray_cluster, tmp_path):
    write_archive(tmp_path / "arc", [["a.png", "b.png"], ["c.png"]])
    edit_manifest(tmp_path / "arc", lambda d: d["shards"][0].update(rows=1279))
    facts = archive_info(str(tmp_path / "arc"))
    assert (facts["items"], facts["shards"]) == (1, 1)  # what the readable shard holds
    assert [p.split(": ", 1)[1] for p in facts["problems"]] == ["2 rows, manifest says 1279"]
    shown = run("info", tmp_path / "arc")
    assert shown.exit_code == 0 and "items     1 in 1 shards" in shown.output and "1279" in shown.output
    report = run_verify(str(tmp_path / "arc"))
    assert not report.intact and any("2 rows, manifest says 1279" in p for p in report.problems)


@pytest.mark.parametrize("edit, sentence", [
    (lambda text: text.replace('"rows": 2', '"rows": 1e400', 1), "manifest is not valid JSON"),
    (lambda text: text.replace('"format_version": 3', '"format_version": "3"', 1), "format_version must be a whole number"),
    (lambda text: text.replace('"failures": null', '"failures": {"path": "/etc/hostname", "rows": 1, "bytes": 9, '
                               '"sha256": "' + "0" * 64 + '"}', 1), "failures.path is not a path inside the archive"),
])  # fmt: skip
def test_a_malformed_manifest_is_one_sentence_for_every_command(ray_cluster, tmp_path, edit, sentence):
    write_archive(tmp_path / "arc", [["a.png", "b.png"]])
    as_whole_manifest(tmp_path / "arc").write_text(edit((tmp_path / "arc" / MANIFEST).read_text()))
    for command in (["info", "--json"], ["verify"], ["decode", tmp_path / "out"], ["cat", "a.png", "-o", tmp_path / "a"]):
        result = run(command[0], tmp_path / "arc", *command[1:])
        assert result.exit_code == 1, (command, result.output)
        assert sentence in result.output and "Traceback" not in result.output and "Infinity" not in result.output


def test_a_truncated_shard_costs_only_itself(ray_cluster, tmp_path):
    write_archive(tmp_path / "arc", [["a.png", "b.png"], ["c.png", "d.png"], ["e.png", "f.png"]])
    damaged = load_manifest(Location(str(tmp_path / "arc"))).shards[1]
    shard = tmp_path / "arc" / damaged.path
    original = shard.read_bytes()
    shard.write_bytes(original[: damaged.bytes // 2])
    result = run_decode(str(tmp_path / "arc"), str(tmp_path / "out"))
    assert result.decoded == 4 and not result.failures
    assert result.problems == [f"{damaged.path}: {damaged.bytes // 2} bytes, the manifest says {damaged.bytes} "
                               "(truncated or replaced)"]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "e.png", "f.png"]
    shown = run("decode", tmp_path / "arc", tmp_path / "again", "--overwrite")
    assert shown.exit_code == EXIT_ITEMS_FAILED and "problem: " + damaged.path in shown.output
    # A shard that keeps its size but not its bytes (one flipped inside a stream, where no Parquet
    # checksum looks) is caught by its SHA-256 before anything is decoded.
    data = bytearray(original)
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert run_decode(str(tmp_path / "arc"), str(tmp_path / "third")).problems == [
        f"{damaged.path}: size or SHA-256 differs from the manifest (damaged or replaced)"
    ]


def test_verify_decodes_so_a_poisoned_stream_is_never_intact(ray_cluster, tmp_path):
    # A stream that parses — right framing, right CRC, the archive's codec and size — but whose payload is
    # no JPEG: checksums alone would call the archive intact, and decode would fail on it.
    poisoned = container.pack(container.Header("jpeg", CODEC.stream_params, b"", 24, 16), b"\xff\xd8 not a jpeg")
    write_archive(tmp_path / "arc", [["a.png", "b.png"]], streams={"b.png": poisoned})
    report = run_verify(str(tmp_path / "arc"))
    assert not report.intact and report.decoded == 1
    assert [(f.key, f.stage) for f in report.failures] == [("b.png", "decode")]
    assert run("verify", tmp_path / "arc").exit_code == EXIT_ITEMS_FAILED
    assert run_verify(str(tmp_path / "arc"), fraction=0.01).decoded == 0  # what --sample leaves out is not decoded


def test_two_keys_never_write_one_file(ray_cluster, tmp_path):
    # Keys that differ only in their extension decode to one file; here they are in different shards, the
    # second added to the manifest by hand (a writer refuses it).
    archive = write_archive(tmp_path / "arc", [["a.png", "dup.jpg"], ["z.png"]])
    images = [photo_like(16, 24, seed=10 + i) for i in range(2)]
    items = [EncodedItem(k, s, 24, 16, 1000, "0" * 64) for k, s in zip(["dup.png", "z.png"], CODEC.encode(images))]
    shard = write_shard(archive, items[:1], SPEC)
    edit_manifest(tmp_path / "arc", lambda d: d["shards"].append(shard.__dict__))
    result = run_decode(str(tmp_path / "arc"), str(tmp_path / "out"))
    assert result.decoded == 3
    assert [(f.key, f.stage, f.reason) for f in result.failures] == [
        ("dup.png", "write", "decodes to the same file as 'dup.jpg' (the keys differ only in their extension); rename "
                             "one of them; not written")
    ]
    expected = CODEC.decode(CODEC.encode([photo_like(16, 24, seed=1)]))[0]  # dup.jpg's image, not dup.png's
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "dup.png")), expected)
