"""Pre-flight: a job that cannot finish says so before Ray starts and before any image is encoded.

Every test here runs the real command in this process and then checks that Ray was never started: the
failure was found by pre-flight, not after a shard had been encoded.
"""

import socket
import subprocess
import sys
import time

import pytest
import ray
import s3fs
from click.testing import CliRunner

from diffarc.jobs.cli import main
from diffarc.jobs.options import EXIT_ITEMS_FAILED

from ..conftest import cli_env
from .test_error_policy import assert_one_sentence, write_archive

pytestmark = pytest.mark.slow


def run(*args, env=None):
    assert not ray.is_initialized()
    result = CliRunner(env=env).invoke(main, [str(a) for a in args])
    assert not ray.is_initialized(), "pre-flight should have failed before Ray started"
    return result


def test_encode_into_a_missing_bucket_fails_at_once(s3_server, image_folder):
    # ddcm: an hour per shard on a CPU, and until now the bucket was first touched when a shard was written.
    started = time.perf_counter()
    result = run("encode", image_folder, "s3://no-such-bucket/photos.diffarc", "--codec", "ddcm",
                 env=s3_server["env"])  # fmt: skip
    seconds = time.perf_counter() - started
    assert_one_sentence(result, "s3://no-such-bucket/photos.diffarc", "bucket 'no-such-bucket' does not exist")
    assert seconds < 10, seconds


def test_missing_buckets_on_every_side_are_named(s3_server, image_folder, tmp_path):
    env = s3_server["env"]
    assert_one_sentence(run("encode", "s3://no-photos/images", tmp_path / "arc", env=env),
                        "cannot read the source s3://no-photos/images", "bucket 'no-photos' does not exist")  # fmt: skip
    assert not (tmp_path / "arc").exists()
    write_archive(tmp_path / "arc", "jpeg", {})
    assert_one_sentence(run("decode", tmp_path / "arc", "s3://no-output/restored", env=env),
                        "cannot write to the destination", "bucket 'no-output' does not exist")  # fmt: skip
    assert_one_sentence(run("decode", "s3://no-archive/arc", tmp_path / "out", env=env),
                        "cannot read the archive", "bucket 'no-archive' does not exist")  # fmt: skip
    assert_one_sentence(run("info", "s3://no-archive/arc", env=env), "bucket 'no-archive' does not exist")
    assert_one_sentence(run("verify", tmp_path / "arc", "--against", "s3://no-originals/x", env=env),
                        "bucket 'no-originals' does not exist")  # fmt: skip


def test_encode_without_credentials_says_how_to_give_them(s3_server, image_folder):
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    if not fs.exists("credless"):
        fs.mkdir("credless")
    env = {k: v for k, v in cli_env().items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3_server["endpoint"], AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "diffarc.jobs.cli", "encode", str(image_folder), "s3://credless/arc", "--codec", "jpeg"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no S3 credentials were found" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "Ray" not in done.stderr


def test_resuming_with_other_parameters_is_refused_in_words(image_folder, tmp_path):
    write_archive(tmp_path / "arc", "avif", {"quality": 60})
    result = run("encode", image_folder, tmp_path / "arc", "--codec", "avif", "--param", "quality=30")
    assert_one_sentence(result, f"{tmp_path / 'arc'} was encoded with avif quality=60; this job asks for avif quality=30")
    other_codec = run("encode", image_folder, tmp_path / "arc", "--codec", "webp")
    assert_one_sentence(other_codec, "was encoded with avif; this job asks for webp")


def test_decode_to_an_unwritable_destination_exits_1_not_3(tmp_path):
    write_archive(tmp_path / "arc", "jpeg", {})
    (tmp_path / "blocker").write_text("a file where DST's parent folder should be")
    result = run("decode", tmp_path / "arc", tmp_path / "blocker" / "out")
    assert result.exit_code != EXIT_ITEMS_FAILED
    assert_one_sentence(result, f"cannot write to the destination {tmp_path / 'blocker' / 'out'}")


def test_encode_into_an_unwritable_archive_location(image_folder, tmp_path):
    (tmp_path / "blocker").write_text("")
    assert_one_sentence(run("encode", image_folder, tmp_path / "blocker" / "arc"),
                        f"cannot write to the archive {tmp_path / 'blocker' / 'arc'}")  # fmt: skip


def test_a_missing_source_is_answered_before_a_codec_pyarrow_or_ray_is_imported(tmp_path):
    # With the default codec (hfd) the answer used to wait for torch and diffusers: 4.3 s on 2 cores.
    script = (
        "import sys\n"
        "from diffarc.jobs.cli import main\n"
        "try:\n"
        "    main(['encode', sys.argv[1], sys.argv[2]], standalone_mode=False)\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'ray', 'pyarrow', 'diffarc.codecs.hfd') if m in sys.modules))\n"
    )
    shown = subprocess.run([sys.executable, "-c", script, str(tmp_path / "no-such-folder"), str(tmp_path / "arc")],
                           capture_output=True, text=True, timeout=120, env=cli_env())  # fmt: skip
    assert shown.stdout.splitlines() == [f"source {tmp_path / 'no-such-folder'} does not exist", "[]"], shown.stderr
    assert not (tmp_path / "arc").exists()


def test_an_address_where_no_ray_answers_is_refused_at_once(image_folder, tmp_path):
    # Ray itself retries such an address for minutes, printing its own warnings beside a progress line of 0.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # free once the probe closes: nothing listens there
    started = time.perf_counter()
    result = run("encode", image_folder, tmp_path / "arc", "--codec", "jpeg", "--address", address)
    assert_one_sentence(result, f"no Ray cluster answers at {address}", "ray start --head", "leave out --address")
    assert time.perf_counter() - started < 10 and not (tmp_path / "arc").exists()


def test_a_ray_that_cannot_start_is_one_sentence_and_nothing_is_written(image_folder, tmp_path):
    # A temporary folder too deep for Ray's sockets (a unix socket's path holds at most 107 bytes): the job's
    # own Ray cannot start. In a process of its own, so that the failed start touches no other test's Ray.
    deep = tmp_path / ("x" * 110)
    deep.mkdir()
    encode = [sys.executable, "-m", "diffarc.jobs.cli", "encode", str(image_folder), str(tmp_path / "arc"), "--codec", "jpeg"]
    result = subprocess.run(encode, env=cli_env(RAY_TMPDIR=str(deep)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.startswith("Error: could not start a Ray of this job's own (") and "Traceback" not in result.stderr
    assert "the job did not run" in result.stderr and not (tmp_path / "arc").exists()
