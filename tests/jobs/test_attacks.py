"""Issue 24's attack, replayed as a hostile archive's author and as a careless user: the `diffarc` commands
of each finding, run in this process on a real local Ray, and what they must no longer do. Nothing
outside the archive and DST is deleted, overwritten or read, and verify calls no poisoned archive INTACT."""

import os
import shutil

import pytest
from click.testing import CliRunner

from diffarc.jobs.cli import main

pytestmark = pytest.mark.slow


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def victim_folder(path):
    """Files a user keeps outside the archive: each must still be there, unchanged, after the attack."""
    (path / "sub").mkdir(parents=True)
    files = {path / "keep.txt": b"keep", path / "sub" / "deep.txt": b"deep",
             path / f"part-{'0' * 32}.parquet": b"a name diffarc writes"}  # fmt: skip
    for file, data in files.items():
        file.write_bytes(data)
    return files


def assert_untouched(files):
    for file, data in files.items():
        assert file.read_bytes() == data, file


# ---------------------------------------------------------------- 1: deletes outside the archive


@pytest.mark.parametrize("folder", ["models", "shards", "failures"])
def test_resuming_into_an_archive_with_a_linked_folder_deletes_nothing_outside_it(ray_cluster, image_folder, tmp_path, folder):
    arc = tmp_path / "a.arc"
    assert run("encode", image_folder, arc, "--codec", "avif").exit_code == 0
    files = victim_folder(tmp_path / "v")
    if (arc / folder).exists():  # the committed shards move into the victim's folder, which the link names
        for shard in (arc / folder).iterdir():
            shutil.move(shard, tmp_path / "v")
        (arc / folder).rmdir()
    os.symlink(tmp_path / "v", arc / folder)
    result = run("encode", image_folder, arc, "--codec", "avif")
    assert result.exit_code == 1 and f"{folder} is a symbolic link" in result.output, result.output
    assert_untouched(files)


# ---------------------------------------------------------------- 2: overwrites outside the archive


@pytest.mark.parametrize("link", [os.symlink, os.link])
def test_a_linked_writer_lock_is_never_written(ray_cluster, image_folder, tmp_path, link):
    arc = tmp_path / "a.arc"
    arc.mkdir()
    target = tmp_path / "precious.txt"
    target.write_bytes(b"precious")
    link(target, arc / "writer.lock")
    result = run("encode", image_folder, arc, "--codec", "avif")
    assert result.exit_code == 1 and "writer.lock" in result.output, result.output
    assert target.read_bytes() == b"precious"
