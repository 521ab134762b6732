"""Listing what to encode: folders (local and in memory) and list files of URLs, and which keys are refused."""

import hashlib

import fsspec
import pytest

from diffarc.pipeline.sources import (
    SourceItem, fetch, hide_credentials, key_problem, list_sources, sha256_hex, without_credentials,
)


def test_a_folder_lists_image_files_by_relative_key_and_counts_the_rest(tmp_path):
    for name in ["b.png", "a.JPG", "sub/deeper/c.webp", "README.txt", ".DS_Store", "sub/notes.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listing = list_sources(str(tmp_path))
    assert [item.key for item in listing.items] == ["a.JPG", "b.png", "sub/deeper/c.webp"]
    assert listing.items[2].url == f"{tmp_path}/sub/deeper/c.webp"
    assert listing.skipped_non_images == 3
    assert fetch(listing.items[1]) == b"x"


def test_an_in_memory_folder_lists_the_same_way():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/sources-test/x/1.png": b"one", "/sources-test/x/2.tif": b"two", "/sources-test/x/3.txt": b""})
    listing = list_sources("memory://sources-test/x")
    assert [i.key for i in listing.items] == ["1.png", "2.tif"] and listing.skipped_non_images == 1
    assert fetch(listing.items[1]) == b"two"


def test_a_list_file_skips_comments_and_blank_lines_and_keeps_each_url_once(tmp_path):
    (tmp_path / "img.png").write_bytes(b"png bytes")
    listing_file = tmp_path / "list.txt"
    listing_file.write_text(
        "# photos to archive\n\n"
        f"file://{tmp_path}/img.png\n"
        "  s3://bucket/z/last.jpg  \n"
        f"file://{tmp_path}/img.png\n"
        "https://example.org/a/first.webp\n"
    )
    listing = list_sources(str(listing_file))
    assert listing.items == [  # sorted by key; a key is the URL without its scheme
        SourceItem("bucket/z/last.jpg", "s3://bucket/z/last.jpg"),
        SourceItem("example.org/a/first.webp", "https://example.org/a/first.webp"),
        SourceItem(f"{tmp_path}/img.png".lstrip("/"), f"file://{tmp_path}/img.png"),
    ]
    assert listing.skipped_non_images == 0
    assert fetch(listing.items[2]) == b"png bytes"


def test_a_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_sources(str(tmp_path / "nowhere"))


def test_sha256_hex():
    assert sha256_hex(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_list_file_urls_are_normalised_and_no_entry_is_dropped_without_a_record(tmp_path):
    (tmp_path / "x.png").write_bytes(b"local")
    listing_file = tmp_path / "list.txt"
    listing_file.write_text("\n".join([
        f"file://{tmp_path}/x.png", f"{tmp_path}/x.png", f"/{tmp_path}/./x.png",  # one local file, three ways
        f"s3://{str(tmp_path).lstrip('/')}/x.png",  # another object with the same key
        "relative/y.png", "./relative/y.png",
    ]))  # fmt: skip
    listing = list_sources(str(listing_file))
    key = f"{tmp_path}/x.png".lstrip("/")
    assert [i.key for i in listing.items] == ["relative/y.png", key]
    assert listing.refused == {f"s3://{key}": f"its key {key!r} is already the key of {tmp_path}/x.png"}


def test_credentials_in_urls_never_reach_a_key(tmp_path):
    listing_file = tmp_path / "list.txt"
    signed = "https://bucket.s3.amazonaws.com/p.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA{}&X-Amz-Signature={}"
    listing_file.write_text("\n".join([
        "http://user:hunter2@host.example/a.png",
        signed.format("A", "deadbeef"), signed.format("B", "cafe"),  # one object, signed twice: one item
        "https://host.example/image?id=3",  # a query that names the image stays in its key
        "s3://bucket/b.png#fragment",
    ]))  # fmt: skip
    listing = list_sources(str(listing_file))
    assert sorted(i.key for i in listing.items) == [
        "bucket.s3.amazonaws.com/p.png", "bucket/b.png", "host.example/a.png", "host.example/image?id=3",
    ]  # fmt: skip
    assert not listing.refused
    assert all("hunter2" not in i.key and "AKIA" not in i.key and "deadbeef" not in i.key for i in listing.items)
    by_key = {i.key: i.url for i in listing.items}
    assert by_key["host.example/a.png"] == "http://user:hunter2@host.example/a.png"  # fetching still can log in
    assert without_credentials(signed.format("A", "deadbeef")) == "https://bucket.s3.amazonaws.com/p.png"
    message = f"ClientResponseError: 403, url='{signed.format('A', 'deadbeef')}' (signature deadbeef expired)"
    hidden = hide_credentials(message, signed.format("A", "deadbeef"))
    assert "deadbeef" not in hidden and "AKIA" not in hidden and "https://bucket.s3.amazonaws.com/p.png" in hidden
    assert hide_credentials("401 for user:hunter2@host.example", "http://user:hunter2@host.example/a.png") == "401 for ***@host.example"


def test_keys_that_cannot_name_a_decoded_file_are_refused_with_a_reason():
    fs = fsspec.filesystem("memory")
    long_name = "x" * 300 + ".png"
    fs.pipe({f"/undecodable/{name}": b"." for name in
             ["ok.png", "back\\slash.png", long_name, "a//b.png", "c/../d.png", "dup.jpg", "dup.png", "sub/dup.PNG"]})
    listing = list_sources("memory://undecodable")
    assert [i.key for i in listing.items] == ["dup.jpg", "ok.png", "sub/dup.PNG"]
    assert listing.refused == {
        "a//b.png": "key has an empty, '.' or '..' component: it cannot name a decoded file",
        "back\\slash.png": "key has a backslash: it cannot name a decoded file",
        "c/../d.png": "key has an empty, '.' or '..' component: it cannot name a decoded file",
        long_name: "key has a name longer than a file name may be (255 bytes): it cannot name a decoded file",
        "dup.png": "decodes to the same file as 'dup.jpg' (the keys differ only in their extension); rename one of them",
    }
    for key in ["ok.png", "sub/dup.PNG", "a b/ü.png", "y" * 250 + ".png"]:
        assert key_problem(key) is None, key
