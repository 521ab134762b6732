"""diffarc archives in Ray Data on a real local Ray: read_archive / iter_archive against `diffarc decode`,
feeding a 2-worker TorchTrainer, and write_archive committing a Ray Data pipeline's output as encode does."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import diffarc
from diffarc.codecs.errors import ArchiveError
from diffarc.jobs.cli import main
from diffarc.pipeline.archive import (
    ArchiveWriter, CodecSpec, EncodedItem, read_failures, read_shard, require_manifest, write_shard,
)
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.storage import Location

from ..conftest import REPO, cli_env, photo_like

pytestmark = pytest.mark.slow

IMAGES = 8


@pytest.fixture(scope="module")
def ray_four_cpus():
    """A real local Ray with room for two training workers and the decoding actors beside them."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def archive_keys(url: str) -> list[str]:
    archive = Location(url)
    return [k for e in require_manifest(archive).shards for k in read_shard(archive, e, ["key"]).column("key").to_pylist()]


@pytest.fixture(scope="module")
def encoded(ray_four_cpus, tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """An archive written by `diffarc encode` (jpeg: lossy, so decoding is not the identity), in three shards,
    and what `diffarc decode` makes of it: key → pixels."""
    root = tmp_path_factory.mktemp("encoded")
    (root / "src" / "sub").mkdir(parents=True)
    keys = [f"{'sub/' if i % 3 == 0 else ''}img{i}.png" for i in range(IMAGES)]
    for index, key in enumerate(keys):
        Image.fromarray(photo_like(32, 48, seed=index)).save(root / "src" / key)
    cli("encode", root / "src", root / "arc", "--codec", "jpeg", "--param", "quality=60", "--shard-size", "3")
    cli("decode", root / "arc", root / "out")
    decoded = {key: np.asarray(Image.open(root / "out" / key)) for key in keys}
    return str(root / "arc"), decoded


def test_read_archive_rows_are_the_images_decode_writes(encoded):
    url, decoded = encoded
    rows = diffarc.read_archive(url).take_all()
    assert sorted(row["key"] for row in rows) == sorted(decoded)  # every key, exactly once
    for row in rows:
        assert row["image"].dtype == np.uint8 and (row["height"], row["width"]) == row["image"].shape[:2] == (32, 48)
        assert np.array_equal(row["image"], decoded[row["key"]]), row["key"]


def test_iter_archive_yields_the_rows_of_read_archive(encoded):
    url, _ = encoded
    read = {row["key"]: row for row in diffarc.read_archive(url, actors=1, batch_size=2).take_all()}
    iterated = list(diffarc.iter_archive(url, batch_size=3))
    assert len(iterated) == len(read) == IMAGES and {row["key"] for row in iterated} == set(read)
    for row in iterated:
        assert (row["width"], row["height"]) == (read[row["key"]]["width"], read[row["key"]]["height"])
        assert np.array_equal(row["image"], read[row["key"]]["image"])


def count_shard(config: dict) -> None:
    """A Ray Train worker: iterate its shard of the dataset as torch batches; write what it saw."""
    import ray.train
    import torch

    def collate(batch: dict) -> dict:
        return {"key": list(batch["key"]), "image": torch.as_tensor(np.stack(list(batch["image"])))}

    keys, pixel_sum = [], 0
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=3, collate_fn=collate):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (32, 48, 3)
        keys += batch["key"]
        pixel_sum += int(batch["image"].sum(dtype=torch.int64))
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"{rank}.json").write_text(json.dumps({"keys": keys, "pixel_sum": pixel_sum}))
    ray.train.report({"images": len(keys)})


def test_read_archive_feeds_a_two_worker_torch_trainer(encoded, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    url, decoded = encoded
    (tmp_path / "seen").mkdir()
    trainer = TorchTrainer(
        count_shard, train_loop_config={"out": str(tmp_path / "seen")},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(storage_path=str(tmp_path / "runs")),
        datasets={"train": diffarc.read_archive(url, actors=1)},
    )  # fmt: skip
    trainer.fit()
    seen = [json.loads((tmp_path / "seen" / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert all(s["keys"] for s in seen)  # both workers were fed
    assert sorted(seen[0]["keys"] + seen[1]["keys"]) == sorted(decoded)  # every image once, over both
    assert seen[0]["pixel_sum"] + seen[1]["pixel_sum"] == sum(int(p.sum(dtype=np.int64)) for p in decoded.values())


def source_rows(count: int) -> list[dict]:
    return [{"key": f"p{i:02d}", "image": photo_like(24 + 8 * (i % 3), 40, seed=10 + i)} for i in range(count)]


def test_a_ray_data_pipeline_is_written_as_an_archive_that_verify_and_decode_accept(ray_four_cpus, tmp_path):
    import ray

    url = str(tmp_path / "arc")
    rows = source_rows(5)
    # The user's own pipeline: a map_batches step before the archive (here, a horizontal flip).
    ds = ray.data.from_items(rows).map_batches(lambda b: {"key": b["key"], "image": [i[:, ::-1] for i in b["image"]]})
    manifest = diffarc.write_archive(ds, url, codec="webp", params={"quality": 90}, shard_size=2)
    assert manifest.complete and manifest.totals["items"] == 5
    assert manifest.totals["source_bytes"] == sum(r["image"].nbytes for r in rows)  # raw pixels are the source
    assert "INTACT" in cli("verify", url)
    cli("decode", url, tmp_path / "out")
    codec = create_codec("webp", {"quality": 90})
    for row in rows:  # what the pipeline made, encoded by the codec, is what decode writes
        expected = codec.decode(codec.encode([np.ascontiguousarray(row["image"][:, ::-1])]))[0]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{row['key']}.png")), expected)

    # Rows of images of several sizes come back through read_archive (a column of tensors of varying shapes).
    back = {row["key"]: row for row in diffarc.read_archive(url).take_all()}
    assert {k: v["image"].shape for k, v in back.items()} == {r["key"]: r["image"].shape for r in rows}


def noise_rows(count: int) -> list[dict]:
    return [{"key": f"p{i:02d}", "image": np.random.default_rng(i).integers(0, 256, (24, 32, 3), np.uint8)}
            for i in range(count)]  # fmt: skip


# A user's job in its own process: its pipeline is quick for the first two rows and then stalls, so the
# first shard is committed while the rest are still on their way. Its own local Ray, as a user's would be.
KILLED_JOB = """
import sys, time
import ray
import diffarc
from tests.pipeline.test_ray_data import noise_rows

def stall_after_two(batch):
    if batch["key"][0] not in ("p00", "p01"):
        time.sleep(300)
    return batch

ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
rows = ray.data.from_items(noise_rows(8), override_num_blocks=8).map_batches(stall_after_two, batch_size=1)
diffarc.write_archive(rows, sys.argv[1], codec="jpeg", shard_size=2)
"""


def test_a_killed_write_archive_resumes_and_archives_every_key_exactly_once(ray_four_cpus, tmp_path):
    import ray

    url = str(tmp_path / "arc")
    archive = Location(url)
    job = subprocess.Popen([sys.executable, "-c", KILLED_JOB, url], cwd=REPO, env=cli_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (archive.exists("manifest.json") and require_manifest(archive).shards):
            assert job.poll() is None, job.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the job committed no shard"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    killed = require_manifest(archive)
    assert not killed.complete and sorted(archive_keys(url)) == ["p00", "p01"]

    rows = noise_rows(8)
    resumed = diffarc.write_archive(ray.data.from_items(rows), url, codec="jpeg", shard_size=2)
    assert resumed.complete and sorted(archive_keys(url)) == [r["key"] for r in rows]  # none lost, none twice
    assert resumed.shards[0] == killed.shards[0]  # the killed job's committed shard stands, not encoded again
    again = diffarc.write_archive(ray.data.from_items(rows), url, codec="jpeg", shard_size=2)
    assert again.shards == resumed.shards and sorted(archive_keys(url)) == [r["key"] for r in rows]
    assert "INTACT: 8 items" in cli("verify", url)
    with pytest.raises(ArchiveError, match="was encoded with jpeg"):
        diffarc.write_archive(ray.data.from_items(rows), url, codec="webp")


def test_write_archive_takes_image_files_and_records_those_that_are_not_images(ray_four_cpus, image_folder, tmp_path):
    import ray

    (image_folder / "notes.png").write_text("not an image")
    files = ray.data.read_binary_files(str(image_folder), include_paths=True)
    ds = files.map(lambda r: {"key": str(Path(r["path"]).relative_to(image_folder)), "bytes": r["bytes"]})
    url = str(tmp_path / "arc")
    manifest = diffarc.write_archive(ds, url, codec="jpeg", shard_size=4)
    assert manifest.totals["items"] == 6 and sorted(archive_keys(url)) == sorted(
        str(p.relative_to(image_folder)) for p in image_folder.rglob("*") if p.is_file() and p.name != "notes.png"
    )
    failures = read_failures(Location(url), manifest)
    assert list(failures) == ["notes.png"] and failures["notes.png"].stage == "load"
    assert manifest.totals["source_bytes"] == sum(p.stat().st_size for p in image_folder.rglob("*.*") if p.name != "notes.png")


def test_write_archive_refuses_rows_it_cannot_archive_exactly_once(ray_four_cpus, tmp_path):
    import ray

    twice = ray.data.from_items([{"key": "a", "image": photo_like(8, 8, 0)}, {"key": "a", "image": photo_like(8, 8, 1)}])
    with pytest.raises(Exception, match="holds the key 'a' more than once"):
        diffarc.write_archive(twice, str(tmp_path / "twice"), codec="jpeg")
    with pytest.raises(Exception, match="need a key column and an image or bytes column"):
        diffarc.write_archive(ray.data.from_items([{"name": "a"}]), str(tmp_path / "nokey"), codec="jpeg")


def test_write_archive_records_every_key_decode_could_not_give_back(ray_four_cpus, tmp_path):
    import ray

    keys = ["../x.png", "/abs.png", "", "nul\0.png", "a.jpg", "fine.png", "a.png"]
    rows = ray.data.from_items([{"key": key, "image": photo_like(8, 8, i)} for i, key in enumerate(keys)])
    url = str(tmp_path / "arc")
    # One row a shard: a.jpg and a.png reach the writer in separate commits, in whatever order they finish.
    manifest = diffarc.write_archive(rows, url, codec="jpeg", shard_size=1)
    stored = sorted(archive_keys(url))
    failures = read_failures(Location(url), manifest)
    assert stored in (["a.jpg", "fine.png"], ["a.png", "fine.png"])
    assert set(failures) == {"../x.png", "/abs.png", "", "nul\0.png", ({"a.jpg", "a.png"} - set(stored)).pop()}
    assert all(f.stage == "list" for f in failures.values())
    decoded = cli("decode", url, str(tmp_path / "out"))
    assert "decoded 2 images" in decoded and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "fine.png"]


def test_read_archive_refuses_what_is_not_an_archive(ray_four_cpus, image_folder):
    with pytest.raises(ArchiveError, match="no diffarc archive at"):
        diffarc.read_archive(str(image_folder))
    with pytest.raises(ArchiveError, match="no diffarc archive at"):
        next(diffarc.iter_archive(str(image_folder)))


def test_an_incomplete_archive_is_read_as_far_as_it_is_committed(ray_four_cpus, tmp_path, caplog):
    """An encode that stopped (or is still running) leaves committed shards: those are read, with a warning."""
    archive = Location(str(tmp_path / "arc"))
    codec = create_codec("jpeg", {})
    images = {f"k{i}": photo_like(16, 24, seed=i) for i in range(3)}
    with ArchiveWriter(archive, CodecSpec.of(codec), "test") as writer:  # committed, never finished
        items = [EncodedItem(k, codec.encode([p])[0], 24, 16, p.nbytes, "0" * 64) for k, p in images.items()]
        writer.commit(write_shard(archive, items, writer.manifest.codec), list(images), [])
    write_shard(archive, items[:1], writer.manifest.codec)  # written, never committed: not part of the archive
    rows = diffarc.read_archive(archive.url).take_all()
    assert sorted(row["key"] for row in rows) == sorted(images)
    assert "is not complete" in caplog.text
    expected = {k: codec.decode(codec.encode([p]))[0] for k, p in images.items()}
    assert all(np.array_equal(row["image"], expected[row["key"]]) for row in rows)


def test_an_archive_on_s3_is_written_and_read_with_storage_options(ray_four_cpus, s3_server):
    """The storage options travel with the archive's location to every actor and task (a real S3 server)."""
    import ray
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    if not fs.exists("ray-data"):
        fs.mkdir("ray-data")
    url, options = "s3://ray-data/arc", s3_server["storage_options"]
    rows = source_rows(4)
    diffarc.write_archive(ray.data.from_items(rows), url, codec="jpeg", storage_options=options, shard_size=2)
    read = {row["key"]: row["image"] for row in diffarc.read_archive(url, options).take_all()}
    iterated = {row["key"]: row["image"] for row in diffarc.iter_archive(url, options)}
    codec = create_codec("jpeg", {})
    assert sorted(read) == sorted(iterated) == [r["key"] for r in rows]
    for row in rows:
        expected = codec.decode(codec.encode([row["image"]]))[0]
        assert np.array_equal(read[row["key"]], expected) and np.array_equal(iterated[row["key"]], expected)
