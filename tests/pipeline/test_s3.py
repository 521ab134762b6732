"""S3 → archive on S3 → decode to local, against a real S3-compatible server (moto) through s3fs."""

import json
import os

import numpy as np
import pytest
import s3fs
from click.testing import CliRunner
from PIL import Image

from diffarc.codecs.registry import create_codec
from diffarc.jobs.cli import main
from diffarc.pipeline.decode import run_decode
from diffarc.pipeline.encode import EncodeOptions, run_encode
from diffarc.pipeline.verify import run_verify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """Ray started with the AWS variables set, so its workers find the server the way users' would."""
    import ray

    saved = {k: os.environ.get(k) for k in s3_server["env"]}
    os.environ.update(s3_server["env"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield s3_server
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def upload(s3_server, folder, bucket, archive_bucket) -> s3fs.S3FileSystem:
    """The source images in one bucket, an empty bucket for the archive (diffarc creates no buckets)."""
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    for name in (bucket, archive_bucket):
        if not fs.exists(name):
            fs.mkdir(name)
    fs.put(str(folder) + "/", f"{bucket}/images/", recursive=True)
    return fs


def test_s3_source_to_s3_archive_to_local_files(s3_ray, image_folder, tmp_path):
    fs = upload(s3_ray, image_folder, "photos", "archives")
    options = s3_ray["storage_options"]
    summary = run_encode("s3://photos/images", "s3://archives/run1", EncodeOptions("jpeg", shard_size=4),
                         storage_options=options)
    assert summary.encoded == 6 and summary.failed == 0
    assert fs.exists("archives/run1/manifest.json")
    assert len(fs.ls("archives/run1/shards")) == 2
    result = run_decode("s3://archives/run1", str(tmp_path / "out"), storage_options=options)
    assert result.decoded == 6 and not result.failures
    codec = create_codec("jpeg")
    original = np.asarray(Image.open(image_folder / "sub" / "e.jpg").convert("RGB"))
    decoded = np.asarray(Image.open(tmp_path / "out" / "sub" / "e.png"))
    assert np.array_equal(decoded, codec.decode(codec.encode([original]))[0])
    report = run_verify("s3://archives/run1", against="s3://photos/images", storage_options=options)
    assert report.intact and len(report.quality) == 6


def test_cli_finds_the_server_from_aws_environment_variables(s3_ray, image_folder):
    upload(s3_ray, image_folder, "envphotos", "envarchive")
    runner = CliRunner()
    encoded = runner.invoke(main, ["encode", "s3://envphotos/images", "s3://envarchive/a", "--codec", "webp", "--json"])
    assert encoded.exit_code == 0, encoded.output
    assert json.loads(encoded.stdout)["encoded"] == 6
    info = runner.invoke(main, ["info", "s3://envarchive/a", "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["items"] == 6
