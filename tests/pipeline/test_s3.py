"""S3 → archive on S3 → decode to local, against a real S3-compatible server (moto) through s3fs."""

import json
import os

import numpy as np
import pytest
import s3fs
from click.testing import CliRunner
from PIL import Image

from diffarc.codecs.parts.models import MODEL_CACHE_ENV, cached_weights_folder
from diffarc.codecs.registry import create_codec
from diffarc.jobs.cli import main
from diffarc.pipeline.decode import run_decode
from diffarc.pipeline.archive import load_manifest
from diffarc.pipeline.encode import EncodeOptions, run_encode
from diffarc.pipeline.storage import Location
from diffarc.pipeline.verify import run_verify

from ..conftest import save_tiny_ldm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_ray(s3_server, tmp_path_factory):
    """Ray started with the AWS variables set, so its workers find the server the way users' would, and
    with a model cache of its own."""
    import ray

    env = {**s3_server["env"], MODEL_CACHE_ENV: str(tmp_path_factory.mktemp("model-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
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


def test_weights_embedded_in_an_s3_archive_are_fetched_into_the_model_cache_by_fingerprint(s3_ray, image_folder, tmp_path):
    import shutil

    fs = upload(s3_ray, image_folder, "tinyphotos", "tinyarchive")
    options = s3_ray["storage_options"]
    model = save_tiny_ldm(tmp_path / "model")
    params = {"model": str(model), "steps": 3, "codebook": 4, "tile": 2}
    run_encode("s3://tinyphotos/images", "s3://tinyarchive/a", EncodeOptions("ddcm", params, actors=1, embed_model=True),
               storage_options=options)
    fingerprint = load_manifest(Location("s3://tinyarchive/a", options)).codec.fingerprint
    assert fs.exists(f"tinyarchive/a/models/{fingerprint}/unet/diffusion_pytorch_model.safetensors")
    shutil.rmtree(model)
    assert not cached_weights_folder(fingerprint).exists()
    result = run_decode("s3://tinyarchive/a", str(tmp_path / "out"), actors=1, storage_options=options)
    assert result.decoded == 6 and not result.failures
    assert (cached_weights_folder(fingerprint) / "unet" / "config.json").is_file()
    report = run_verify("s3://tinyarchive/a", actors=1, storage_options=options)  # one actor, as encode and decode
    assert report.intact, report.problems


def test_credentials_in_listed_urls_are_used_to_fetch_and_stored_nowhere(s3_ray, image_folder, tmp_path):
    from urllib.parse import parse_qsl, urlsplit

    import boto3

    fs = upload(s3_ray, image_folder, "signedphotos", "signedarchive")
    client = boto3.client("s3", endpoint_url=s3_ray["endpoint"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip

    def signed(key: str) -> str:
        return client.generate_presigned_url("get_object", Params={"Bucket": "signedphotos", "Key": key})

    host = s3_ray["endpoint"].split("://", 1)[1]
    urls = [signed("images/a.png"), signed("images/a.png"),  # one object, signed twice: one item
            signed("images/missing.png"),  # fetching fails: the reason must not carry the signature
            f"http://user:hunter2@{host}/signedphotos/images/sub/e.jpg"]  # fmt: skip
    signatures = [value for u in urls[:3] for name, value in parse_qsl(urlsplit(u).query) if "signature" in name.lower()]
    assert len(signatures) == 3
    secrets = {"hunter2", "Signature="} | set(signatures)
    (tmp_path / "list.txt").write_text("\n".join(urls))
    # No storage options: they would go to the http fetches too; the workers find the server by AWS_* variables.
    summary = run_encode(str(tmp_path / "list.txt"), "s3://signedarchive/a", EncodeOptions("jpeg"))
    assert (summary.encoded, summary.failed) == (2, 1)
    stored = b"".join(fs.cat(path) for path in fs.find("signedarchive/a"))
    assert all(secret.encode() not in stored for secret in secrets)
    info = CliRunner().invoke(main, ["info", "s3://signedarchive/a", "--json"])
    keys = {f"{host}/signedphotos/images/a.png", f"{host}/signedphotos/images/sub/e.jpg"}
    assert json.loads(info.stdout)["items"] == 2 and all(s not in info.stdout for s in secrets)
    decoded = run_decode("s3://signedarchive/a", str(tmp_path / "out"))
    assert decoded.decoded == 2 and {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")} == {
        k.rsplit(".", 1)[0] + ".png" for k in keys
    }
