"""Listing what to encode: folders (local and in memory) and list files of URLs."""

import hashlib

import fsspec
import pytest

from diffarc.pipeline.sources import SourceItem, fetch, list_sources, sha256_hex


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
