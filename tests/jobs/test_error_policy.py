"""The one error policy of `diffarc`: a sentence and exit 1 for what a user can fix, exit 2 for bad usage
(answered without importing torch, Ray or pyarrow), a traceback for bugs and under `--debug`."""

import json
import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from diffarc.codecs.errors import ArchiveError
from diffarc.codecs.registry import create_codec
from diffarc.jobs.cli import main
from diffarc.jobs.options import ErrorPolicyGroup, expected_failure
from diffarc.pipeline.archive import ArchiveWriter, CodecSpec, EncodedItem, write_shard
from diffarc.pipeline.storage import Location

from ..conftest import cli_env, photo_like
from ..pipeline.test_archive import as_whole_manifest

HEAVY = ("torch", "ray", "pyarrow")


def run(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def assert_one_sentence(result, *fragments: str) -> str:
    """Exit 1 and one line on stderr (besides notices) that names the problem: no traceback, class name or repr."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("notice: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    sentence = lines[0][len("Error: "):]
    assert not re.search(r"\b[A-Z]\w*(Error|Exception)\b|Traceback|\w+\(\w+=", sentence), sentence
    for fragment in fragments:
        assert fragment in sentence, sentence
    return sentence


def write_archive(path, codec: str, params: dict, keys=("a.jpg", "b.jpg"), fingerprint: str = "") -> None:
    """A real archive of real streams, written without Ray (as an earlier encode job would have)."""
    coder = create_codec(codec, params)
    image = photo_like(16, 24, seed=3)
    spec = CodecSpec(codec, coder.config, fingerprint)
    archive = Location(str(path))
    writer = ArchiveWriter(archive, spec, source="earlier job")
    items = [EncodedItem(key, coder.encode([image])[0], 24, 16, 100, "0" * 64) for key in keys]
    writer.commit(write_shard(archive, items, spec), list(keys), [])
    writer.finish()


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["encode", "--help"],
        ["bench", "--help"],
        ["encode", "src", "arc", "--bogus"],
        ["encode", "src", "arc", "--param", "quality"],
        ["decode", "arc", "out", "--storage-options", "[1]"],
        ["verify", "arc", "--min-psnr", "30"],
        ["verify", "arc", "--against", "src", "--max-lpips", "0.2"],
        ["train", "autoencoder", "--data", "d", "--out", "o", "--work-dir", "w", "--crop", "36"],
    ],
)
def test_usage_errors_and_help_answer_without_importing_torch_ray_or_pyarrow(args):
    script = (
        "import sys\n"
        "from diffarc.jobs.cli import main\n"
        "try:\n"
        f"    main({args!r}, prog_name='diffarc')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules), 'exit:', code, file=sys.stderr)\n"
    )
    env = {k: v for k, v in cli_env().items() if k != "DIFFARC_LPIPS_WEIGHTS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    expected_exit = 0 if "--help" in args else 2
    assert done.stderr.strip().endswith(f"imported: [] exit: {expected_exit}"), done.stderr


def test_bad_codec_settings_are_one_sentence_before_anything_runs(image_folder, tmp_path):
    assert_one_sentence(run("encode", image_folder, tmp_path / "a", "--codec", "jpeg", "--param", "quality=500"),
                        "parameter 'quality' must be <= 95, got 500")  # fmt: skip
    assert_one_sentence(run("encode", image_folder, tmp_path / "a", "--codec", "nope"), "unknown codec 'nope'", "avif")
    assert_one_sentence(run("encode", image_folder, tmp_path / "a", "--codec", "jpeg", "--preset", "ultra"),
                        "no preset 'ultra'")  # fmt: skip
    missing_model = run("encode", image_folder, tmp_path / "a", "--codec", "ddcm", "--param", f"model={tmp_path / 'no-model'}")
    assert_one_sentence(missing_model, str(tmp_path / "no-model"))
    assert_one_sentence(run("encode", tmp_path / "nowhere", tmp_path / "a"), "source", "does not exist")


def test_missing_archive_and_key_are_one_sentence(tmp_path):
    assert_one_sentence(run("info", tmp_path / "none"), f"no diffarc archive at {tmp_path / 'none'}")
    write_archive(tmp_path / "arc", "jpeg", {})
    assert_one_sentence(run("cat", tmp_path / "arc", "nope.jpg", "-o", tmp_path / "x.png"), "'nope.jpg' is not in the archive")


def test_debug_shows_the_traceback_of_an_expected_failure(tmp_path):
    assert_one_sentence(run("info", tmp_path / "none"), "no diffarc archive")
    loud = run("--debug", "info", tmp_path / "none")
    assert loud.exit_code == 1 and isinstance(loud.exception, ArchiveError)
    assert "no diffarc archive" in str(loud.exception)


def test_a_bug_keeps_its_traceback():
    @click.group(cls=ErrorPolicyGroup)
    @click.option("--debug", is_flag=True)
    def group(debug):
        pass

    @group.command("buggy")
    def buggy():
        {}["missing"]  # a bug, not a user's mistake

    result = CliRunner().invoke(group, ["buggy"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_failures_ray_wraps_are_unwrapped_to_their_sentence():
    from ray.train import WorkerGroupError

    from diffarc.codecs.errors import SourceError

    wrapped = WorkerGroupError("rank 0: Traceback …", {0: SourceError("source /data does not exist")})
    assert expected_failure(wrapped) == "source /data does not exist"
    assert expected_failure(WorkerGroupError("rank 0: Traceback …", {0: ZeroDivisionError()})) is None


def test_verify_thresholds_without_what_they_judge_are_usage_errors(image_folder, tmp_path):
    write_archive(tmp_path / "arc", "jpeg", {})
    no_weights = run("verify", tmp_path / "arc", "--against", image_folder, "--max-lpips", "0.2",
                     env={"DIFFARC_LPIPS_WEIGHTS": None})  # fmt: skip
    assert no_weights.exit_code == 2, no_weights.output
    assert "--lpips-weights" in no_weights.stderr and "DIFFARC_LPIPS_WEIGHTS" in no_weights.stderr
    no_originals = run("verify", tmp_path / "arc", "--min-psnr", "30")
    assert no_originals.exit_code == 2 and "--against" in no_originals.stderr


@pytest.mark.slow
def test_an_expected_failure_inside_a_ray_actor_is_one_sentence(ray_cluster, tmp_path):
    # The manifest claims weights that the jpeg codec does not have: the decode actors refuse it as they start.
    write_archive(tmp_path / "arc", "jpeg", {})
    manifest = as_whole_manifest(tmp_path / "arc")
    document = json.loads(manifest.read_text())
    document["specs"][0]["fingerprint"] = "ab" * 32
    manifest.write_text(json.dumps(document))
    result = run("decode", tmp_path / "arc", tmp_path / "out")
    assert_one_sentence(result, "jpeg streams carry no weights, but this one names fingerprint abab")
    assert not list((tmp_path / "out").rglob("*.png"))
