"""Pre-flight's write probe, on a real S3 server and on disk: it proves a location writable and leaves no trace."""

import pytest
import s3fs

from diffarc.codecs.errors import StorageError
from diffarc.pipeline.preflight import check_writable
from diffarc.pipeline.storage import Location


@pytest.mark.slow
def test_the_probe_leaves_nothing_in_the_bucket(s3_server):
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    if not fs.exists("probed"):
        fs.mkdir("probed")
    check_writable(Location("s3://probed/out", s3_server["storage_options"]), "the destination")
    assert fs.find("probed") == []
    with pytest.raises(StorageError, match="cannot write to the destination s3://unprobed/out: bucket 'unprobed'"):
        check_writable(Location("s3://unprobed/out", s3_server["storage_options"]), "the destination")


def test_the_probe_removes_the_folders_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    check_writable(Location(str(tmp_path / "kept" / "new" / "deeper")), "the archive")
    assert list(tmp_path.rglob("*")) == [tmp_path / "kept"]
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="a file is in the way"):
        check_writable(Location(str(tmp_path / "file" / "sub")), "the archive")
