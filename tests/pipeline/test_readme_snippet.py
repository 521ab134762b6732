"""README's Python snippet, run from a folder that holds the clone (a folder named `diffarc`, which Python
looks at before the installed package): its imports and its loop over `iter_archive`, as written (the
rest starts Ray Data for half a minute; tests/pipeline/test_ray_data.py runs those functions)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffarc.codecs.registry import create_codec
from diffarc.pipeline.archive import ArchiveWriter, CodecSpec, EncodedItem, write_shard
from diffarc.pipeline.storage import Location

from ..conftest import cli_env, photo_like

CLONE = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_readme_snippet_runs_beside_the_clone(tmp_path):
    section = (CLONE / "README.md").read_text().split("## Python API / Ray Data", 1)[1]
    lines = re.search(r"```python\n(.*?)```", section, re.S).group(1).splitlines()
    loop = next(i for i, line in enumerate(lines) if line.startswith("for row in iter_archive("))
    snippet = "\n".join([line for line in lines if line.startswith(("import ", "from "))] + lines[loop : loop + 2])
    (tmp_path / "diffarc").symlink_to(CLONE, target_is_directory=True)
    images = {f"p{i}.png": photo_like(16, 24, seed=i) for i in range(2)}
    codec = create_codec("jpeg", {})
    archive = Location(str(tmp_path / "photos.diffarc"))
    writer = ArchiveWriter(archive, CodecSpec.of(codec), source="test")
    items = [EncodedItem(k, s, 24, 16, 1, "0" * 64) for k, s in zip(images, codec.encode(list(images.values())))]
    writer.commit(write_shard(archive, items, writer.manifest.codec), list(images), [])
    writer.finish()
    (tmp_path / "snippet.py").write_text(snippet)

    run = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=cli_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["p0.png 24 16", "p1.png 24 16"]
