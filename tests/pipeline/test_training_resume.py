"""`diffarc train` killed with SIGKILL mid-run resumes from its last checkpoint, for the tasks whose model
classes are their own: a file of its own so that the test runner can run these slow cases beside the rest.

Every run joins one Ray head started for the module (`--address`), as a user's runs on a cluster do: a
local Ray of its own would cost each of the four runs a cluster start-up, most of what a case costs. A job
that starts its own local Ray and is killed with it is test_kill_resume's; one case runs without Ray
(`--in-process`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from diffarc.pipeline.training import find_resume_checkpoint

from ..conftest import RAY_NODE_ENV, photo_like, ray_head

pytestmark = pytest.mark.slow

# How a subprocess runs `diffarc train`, as a user's shell would.
TRAIN_COMMAND = [sys.executable, "-m", "diffarc.jobs.cli", "train"]


@pytest.fixture(scope="module")
def head() -> str:
    with ray_head(cpus=2) as (address, _):
        yield address


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(5):
        Image.fromarray(photo_like(64 + 8 * seed, 72, seed)).save(folder / f"{seed}.png")
    return folder


def _progress_lines(process: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
    """Read the process's output until a line matches; return all lines read. A process that has printed
    no matching line within `timeout` is killed (its session), which ends the read even while it prints
    nothing: a stuck run fails the test instead of hanging it."""
    lines = []
    deadline = threading.Timer(timeout, os.killpg, (process.pid, signal.SIGKILL))
    deadline.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if re.search(pattern, line):
                break
    finally:
        deadline.cancel()
    return lines


# Checkpoint, kill and resume are the training loop's, the same for every task (pipeline/training.py);
# what a task adds is its model class and its start-up. The three tasks here bring their own model classes
# (hfd's DetailDecoder, glc's transforms, corrdiff-latent's restorer) and caches. The diffusion task's is
# diffusers' UNet2DModel: test_training.py trains it on Ray and loads its export, and test_tasks.py exports
# and loads its taef2 configs (the v-objective one included).
@pytest.mark.parametrize(
    "what, options, written, in_process",
    [
        # hfd's latent config (its pairs cached on disk, the export a vae/ + hfd/ folder).
        ("hfd", ["--config", "latent-tiny", "--batch-size", "2"], ["hfd/config.json", "vae/config.json"], False),
        # glc's transforms on taef2's cached latents (its crops a multiple of its 64-px stride).
        ("glc", ["--config", "tiny", "--batch-size", "2", "--crop", "64"], ["config.json"], False),
        # corrdiff-latent's restorer for builtin:taef2 (its crops decoded with their pictures' pooled statistics).
        ("corrdiff-latent", ["--config", "tiny", "--batch-size", "2", "--crop", "64", "--model", "builtin:taef2"], ["config.json"], False),
        # The same loop without Ray (--in-process): its checkpoints are its own folders, renamed into place.
        ("glc", ["--config", "tiny", "--batch-size", "2", "--crop", "64"], ["config.json"], True),
    ],
)
def test_a_killed_train_resumes_from_its_last_checkpoint(head, images, tmp_path, what, options, written, in_process):
    work, out = tmp_path / "work", tmp_path / "out"
    where = ["--in-process"] if in_process else ["--address", head]
    args = [what, "--data", str(images), "--out", str(out), "--work-dir", str(work),
            "--crop", "32", "--report-seconds", "0", "--checkpoint-minutes", "0.005", *where, *options]  # fmt: skip
    # (a later --crop, as glc's, overrides the first)
    env = {**RAY_NODE_ENV, "PYTHONUNBUFFERED": "1", "DIFFARC_LATENT_CACHE": str(tmp_path / "latents")}
    first = subprocess.Popen(
        TRAIN_COMMAND + args + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, start_new_session=True,
    )
    try:
        lines = _progress_lines(first, r"checkpoint at step \d+", timeout=120)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert any("checkpoint at step" in line for line in lines), "".join(lines[-30:])
    checkpoint = find_resume_checkpoint(work / what)
    assert checkpoint is not None
    saved_step = int(re.search(r'"step": (\d+)', (checkpoint / "progress.json").read_text()).group(1))
    assert saved_step > 0 and not out.exists()

    second = subprocess.run(
        TRAIN_COMMAND + args + ["--steps", str(saved_step + 2)], capture_output=True, text=True, env=env, timeout=180
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", second.stdout + second.stderr)]
    # The cluster ends a dead job's workers once it notices; meanwhile one may persist one more checkpoint:
    # never an older one.
    assert resumed and resumed[0] >= saved_step
    assert f"wrote {out} (step {max(resumed[0], saved_step + 2)}" in second.stdout
    assert all((out / path).is_file() for path in written)
    progress = [line for line in (second.stdout + second.stderr).splitlines() if re.search(r"\] step \d+/", line)]
    assert progress and len(set(progress)) == len(progress), "\n".join(progress)  # each line once, not twice
