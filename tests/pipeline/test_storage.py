"""Location: the one filesystem opener, on local disk and on fsspec's in-memory filesystem."""

import pickle
import uuid

import pytest

from diffarc.pipeline.storage import Location


@pytest.fixture(params=["local", "memory"])
def location(request, tmp_path) -> Location:
    if request.param == "local":
        return Location(str(tmp_path / "root"))
    return Location(f"memory://diffarc-test-{uuid.uuid4().hex}")


def test_write_read_list_delete(location):
    location.write_atomic("b/two.bin", b"2" * 5)
    location.write_atomic("a.bin", b"1")
    location.write_atomic("b/c/three.bin", b"")
    assert location.read("b/two.bin") == b"22222" and location.size("b/two.bin") == 5
    assert location.list_files() == ["a.bin", "b/c/three.bin", "b/two.bin"]
    assert location.list_files("b/c") == ["b/c/three.bin"]
    assert location.exists("a.bin") and not location.exists("nope.bin")
    location.delete("a.bin")
    location.delete("a.bin")  # deleting what is not there is not an error
    assert location.list_files() == ["b/c/three.bin", "b/two.bin"]
    assert Location(location.url + "/missing").list_files() == []
    with pytest.raises(FileNotFoundError):
        location.read("nope.bin")


def test_write_atomic_replaces_whole_and_leaves_no_temporary_files(location):
    location.write_atomic("manifest.json", b"old" * 1000)
    location.write_atomic("manifest.json", b"new")
    assert location.read("manifest.json") == b"new"
    assert location.list_files() == ["manifest.json"]


def test_a_failed_local_write_leaves_the_old_file_and_no_temporary_files(tmp_path):
    location = Location(str(tmp_path))
    (tmp_path / "target").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        location.write_atomic("target", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert (tmp_path / "target").is_dir()


def test_a_location_travels_as_its_url_and_options(tmp_path):
    location = Location(str(tmp_path), {"auto_mkdir": True})
    copy = pickle.loads(pickle.dumps(location))
    assert (copy.url, copy.storage_options, copy.root) == (location.url, {"auto_mkdir": True}, location.root)
    assert copy.is_local and not Location("memory://x").is_local
