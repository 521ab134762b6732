"""Progress people can follow: rate and ETA on a terminal, log lines elsewhere, --log-level, a quiet Ray."""

import io
import json
import os
import select
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from diffarc.jobs.cli import main
from diffarc.jobs.options import PROGRESS_SECONDS_ENV, Progress, describe_progress, set_log_level

from ..conftest import cli_env


def test_a_progress_line_says_rate_eta_and_elapsed_time():
    assert describe_progress("encode", "images", 120, 1000, 3, 30.0) == (
        "encode: 120/1000 (12%), 3 failed, 4.00 images/s, ETA 3m 40s, 30s elapsed"
    )
    assert describe_progress("decode", "images", 7, None, 0, 3700.0) == "decode: 7, 0 failed, 0.00 images/s, 1h 01m elapsed"
    assert "ETA unknown" in describe_progress("encode", "images", 0, 10, 0, 5.0)


def read_all(leader: int) -> str:
    """All a terminal shows until its other end is closed."""
    shown = b""
    # poll, not select: select cannot watch a descriptor numbered 1024 or more, which a long run of
    # the suite in one process reaches.
    readable = select.poll()
    readable.register(leader, select.POLLIN)
    while readable.poll(5000):
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed (EIO)
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return shown.decode()


def test_on_a_terminal_the_line_is_redrawn_in_place_with_rate_and_eta(monkeypatch):
    leader, follower = os.openpty()
    with open(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        set_log_level(None, None, "info")
        with Progress("encode") as progress:
            progress(0, 40, 0)
            time.sleep(0.3)
            progress(10, 40, 1)
    shown = read_all(leader)
    redraws = [line for line in shown.split("\r") if line.strip()]  # the terminal shows "\n" as "\r\n"
    assert redraws[0].startswith("encode: 0/40 (0%), 0 failed, 0.00 images/s, ETA unknown, 0s elapsed")
    assert redraws[-1].startswith("encode: 10/40 (25%), 1 failed,") and "images/s, ETA " in redraws[-1]
    assert shown.endswith("elapsed\x1b[K\r\n")  # the last state stays on screen; what follows starts below it


@pytest.mark.parametrize("level, logged", [("info", True), ("warning", False)])
def test_elsewhere_a_log_line_comes_every_interval_even_without_news(monkeypatch, level, logged):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0.2")
    set_log_level(None, None, level)
    with Progress("verify", unit="shards") as progress:
        progress(2, 5, 0)
        time.sleep(0.7)  # no result in the meantime: the line still comes
    lines = stderr.getvalue().splitlines()
    assert len(lines) >= 2 if logged else lines == []
    assert all(" INFO verify: 2/5 (40%), 0 failed, " in line and "shards/s, ETA" in line for line in lines)
    assert "\r" not in stderr.getvalue()


def test_log_level_is_every_commands_option():
    assert CliRunner().invoke(main, ["codecs", "--log-level", "loud"]).exit_code == 2
    listed = CliRunner().invoke(main, ["codecs", "--json", "--log-level", "error"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)["codecs"]


@pytest.mark.slow
def test_a_job_logs_its_progress_and_ray_keeps_quiet(image_folder, tmp_path):
    env = cli_env(**{PROGRESS_SECONDS_ENV: "0.5"})
    result = subprocess.run(
        [sys.executable, "-m", "diffarc.jobs.cli", "encode", str(image_folder), str(tmp_path / "arc"), "--codec",
         "jpeg", "--json"], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["encoded"] == 6
    progress = [line for line in result.stderr.splitlines() if " INFO encode: " in line]
    assert progress and all("images/s" in line and "elapsed" in line for line in progress)
    assert "Token authentication" not in result.stderr and "WARNING" not in result.stderr, result.stderr
    # decode and verify count images, not shards (6 images in one shard per actor), with total and ETA
    # (tests/pipeline/test_cluster.py: counted within a shard).
    for command in (["decode", str(tmp_path / "arc"), str(tmp_path / "out")], ["verify", str(tmp_path / "arc")]):
        result = subprocess.run([sys.executable, "-m", "diffarc.jobs.cli", *command], env=env, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        progress = [line for line in result.stderr.splitlines() if f" INFO {command[0]}: " in line]
        # Until the archive is opened the total is unknown (and nothing is done); then, while Ray and the
        # actors start too, it is 6 items.
        assert all("/6 (" in line or f" {command[0]}: 0, " in line for line in progress), result.stderr
        assert any("/6 (" in line and "images/s, ETA" in line for line in progress), result.stderr
