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


# ---------------------------------------------------------------- 3: decoding contacts places named by the input


@pytest.fixture
def web_server():
    """A real HTTP server on 127.0.0.1 that counts the requests it gets (every one answered 404)."""
    import http.server
    import threading

    requests = []

    class Counting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/weights", requests
    server.shutdown()


def hyperprior_archive(path, hint: dict, weights: dict | None = None, fingerprint: bytes | None = None) -> bytes:
    """An archive of one hyperprior stream (encoded with `weights`, default the built-in ones; naming
    `fingerprint` if given) whose spec records `hint` as where the weights were; returns the stream."""
    from diffarc.codecs import container
    from diffarc.codecs.registry import create_codec
    from diffarc.pipeline.archive import ArchiveWriter, CodecSpec, EncodedItem, write_shard
    from diffarc.pipeline.storage import Location

    from ..conftest import photo_like

    header, payload = container.unpack(create_codec("hyperprior", weights).encode([photo_like(16, 24, seed=1)])[0])
    fingerprint = fingerprint or header.fingerprint
    stream = container.pack(container.Header("hyperprior", header.params, fingerprint, 24, 16), payload)
    archive = Location(str(path))
    spec = CodecSpec("hyperprior", header.params, fingerprint.hex(), hint=hint)
    writer = ArchiveWriter(archive, spec, source="images")
    writer.commit(write_shard(archive, [EncodedItem("a.png", stream, 24, 16, 1, "0" * 64)], spec), ["a.png"], [])
    writer.finish()
    return stream


def test_a_standalone_stream_naming_a_url_sends_no_request(web_server, tmp_path):
    from diffarc.codecs import container
    from diffarc.codecs.errors import ModelError
    from diffarc.codecs.registry import codec_for_header

    url, requests = web_server
    stream = hyperprior_archive(tmp_path / "arc", {}, fingerprint=b"\x01" * 32)
    header = container.unpack(stream)[0]
    hostile = container.pack(container.Header("hyperprior", {**header.params, "model": url}, header.fingerprint, 24, 16),
                             container.unpack(stream)[1])  # fmt: skip
    with pytest.raises(ModelError, match="no model weights with fingerprint 0101"):
        codec_for_header(container.unpack(hostile)[0])
    assert requests == []


def test_an_archive_whose_hint_is_a_url_is_decoded_without_a_request_unless_the_user_trusts_it(web_server, tmp_path):
    url, requests = web_server
    hyperprior_archive(tmp_path / "found", {"model": url})
    hyperprior_archive(tmp_path / "lost", {"model": url}, fingerprint=b"\x01" * 32)
    # The weights are the built-in ones, found in the package; the URL the archive names is not contacted.
    found = tmp_path / "found"
    result = run("cat", found, "a.png", "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert requests == []
    refused = run("cat", tmp_path / "lost", "a.png", "-o", tmp_path / "b.png")
    assert refused.exit_code == 1 and "--trust-hint to try it" in refused.output, refused.output
    assert requests == []
    trusted = run("cat", tmp_path / "lost", "a.png", "--trust-hint", "-o", tmp_path / "b.png")
    assert trusted.exit_code == 1 and requests, trusted.output  # asked for: the URL is tried (and has nothing)


def test_a_local_folder_named_by_the_archive_is_used_only_when_trusted(tmp_path):
    from ..codecs.test_hyperprior import tiny_model

    tiny_model(seed=3).save_pretrained(tmp_path / "weights")
    hyperprior_archive(tmp_path / "arc", {"model": str(tmp_path / "weights")}, {"model": str(tmp_path / "weights")})
    refused = run("cat", tmp_path / "arc", "a.png", "-o", tmp_path / "a.png")
    assert refused.exit_code == 1 and f"model={tmp_path / 'weights'}, was not looked at" in refused.output
    trusted = run("cat", tmp_path / "arc", "a.png", "--trust-hint", "-o", tmp_path / "a.png")
    assert trusted.exit_code == 0, trusted.output
    assert run("cat", tmp_path / "arc", "a.png", "--model", tmp_path / "weights", "-o", tmp_path / "a.png").exit_code == 0


# ---------------------------------------------------------------- 4: links inside an archive are neither read nor trusted


def linked_outside(arc, relative, outside):
    """Move ARCHIVE/relative outside the archive and leave a symbolic link to it in its place."""
    shutil.move(arc / relative, outside)
    os.symlink(outside, arc / relative)


@pytest.mark.parametrize("what", ["shard", "failures"])
def test_a_linked_shard_or_failure_table_makes_the_archive_not_intact(ray_cluster, image_folder, tmp_path, what):
    arc = tmp_path / "arc"
    (image_folder / "broken.png").write_bytes(b"not an image")  # so that the archive has a failure table
    assert run("encode", image_folder, arc, "--codec", "jpeg").exit_code == 3
    folder = arc / ("shards" if what == "shard" else "failures")
    linked_outside(arc, f"{folder.name}/{next(folder.iterdir()).name}", tmp_path / "outside.parquet")
    verified = run("verify", arc)
    assert verified.exit_code == 3 and "NOT INTACT" in verified.output and "is a symbolic link" in verified.output
    if what == "shard":
        decoded = run("decode", arc, tmp_path / "out")
        assert decoded.exit_code == 3 and "is a symbolic link" in decoded.output


def test_a_linked_log_is_refused_by_every_reader(ray_cluster, image_folder, tmp_path):
    arc = tmp_path / "arc"
    assert run("encode", image_folder, arc, "--codec", "jpeg").exit_code == 0
    linked_outside(arc, "_log", tmp_path / "outside-log")
    for command in (["verify"], ["info"], ["decode", tmp_path / "out"], ["cat", "a.png", "-o", tmp_path / "a"]):
        result = run(command[0], arc, *command[1:])
        assert result.exit_code == 1 and "_log is a symbolic link" in result.output, (command, result.output)
    assert not (tmp_path / "out").exists()
