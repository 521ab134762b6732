"""`diffarc info` in fresh processes: it exits cleanly every time, and loads nothing it does not need."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffarc.codecs.registry import create_codec
from diffarc.pipeline.archive import ArchiveWriter, CodecSpec, EncodedItem, Failure, write_shard
from diffarc.pipeline.storage import Location

from ..conftest import cli_env, photo_like

RUNS = 4  # before the fix about one run in five aborted; the thread test below catches the cause every time


@pytest.fixture(scope="module")
def avif_archive(tmp_path_factory):
    """Two shards of real AVIF streams and a failure table, as `diffarc encode --codec avif` writes them."""
    path = tmp_path_factory.mktemp("info") / "arc"
    archive = Location(str(path))
    codec = create_codec("avif")
    spec = CodecSpec(codec.name, codec.config, "")
    writer = ArchiveWriter(archive, spec, source="images")
    for shard in range(2):
        images = [photo_like(24 + 8 * i, 40, seed=4 * shard + i) for i in range(4)]
        keys = [f"s{shard}/{i}.png" for i in range(4)]
        items = [EncodedItem(k, s, 40, image.shape[0], 5000, "0" * 64)
                 for k, s, image in zip(keys, codec.encode(images), images)]  # fmt: skip
        writer.commit(write_shard(archive, items, spec), keys, [Failure(f"s{shard}/bad.png", "load", "truncated")])
    writer.finish()
    return path


def run_info(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, capture_output=True, text=True, env=cli_env(), timeout=120)


def test_info_exits_cleanly_in_a_process_that_holds_torch(avif_archive):
    # Shard reads used to leave work on pyarrow's thread pools holding Python-owned buffers; a pool
    # thread finishing during interpreter shutdown aborted the process after it had printed its
    # answer. Torch loaded (as it is for decode, verify and cat of the diffusion codecs) slows the
    # shutdown enough that it showed in about one run in five.
    script = "import torch; from diffarc.jobs.cli import main; main()"
    command = [sys.executable, "-c", script, "info", str(avif_archive), "--json"]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_info(command), range(RUNS)))
    codes = [r.returncode for r in results]
    assert codes == [0] * RUNS, [r.stderr[-300:] for r in results if r.returncode]
    facts = json.loads(results[0].stdout)
    assert (facts["items"], facts["failed"], facts["shards"]) == (8, 2, 2)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_reading_an_archive_leaves_no_pyarrow_pool_threads(avif_archive):
    # The cause of the abort above, checked directly: threads started by the reads outlive them.
    script = (
        "import os, sys\n"
        "from diffarc.pipeline.info import archive_info\n"
        "def threads():\n"
        "    tasks = os.listdir('/proc/self/task')\n"
        "    # jemalloc's purging thread never touches Python objects\n"
        "    return {t for t in tasks if open(f'/proc/self/task/{t}/comm').read().strip() != 'jemalloc_bg_thd'}\n"
        "before = threads()\n"
        "archive_info(sys.argv[1])\n"
        "print(len(threads() - before))\n"
    )
    result = run_info([sys.executable, "-c", script, str(avif_archive)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_info_loads_neither_torch_nor_matplotlib(avif_archive):
    script = (
        "import sys; from diffarc.jobs.cli import main\n"
        "try:\n    main()\nfinally:\n"
        "    print(sorted(m for m in ('torch', 'matplotlib', 'diffusers') if m in sys.modules), file=sys.stderr)\n"
    )
    result = run_info([sys.executable, "-c", script, "info", str(avif_archive), "--json"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"
