"""The one key rule: which keys an archive may hold, and the file under DST each decodes to.

A key names its item everywhere (archive rows, failures, decoded files), and decode writes it to
DST/<key with its extension replaced by the output format's>. So a key must be a relative path that
stays below any folder (`key_problem`), and no two keys of an archive may need one path for different
things (`DecodedNames`):

    dup.jpg   beside dup.png       both decode to dup.png (any output format: the same stem)
    a.jpg     beside a.png/x.png   a.jpg decodes to the file a.png, a.png/x.png needs a.png as a folder

The listing applies the rule when encode lists its source (`sources.py`), the writer at every commit
(`ArchiveWriter`, so no writer can store what decode cannot give back), verify to every key of an
archive, and decode once more to what it is about to write; the first key in key order keeps its name.
"""

from __future__ import annotations

import posixpath

from .storage import relative_path_problem

MAX_KEY_BYTES = 1024  # S3's limit on an object key
MAX_NAME_BYTES = 255  # a file name on every common filesystem
# Output format → the extension decode gives a key's file in its place.
OUTPUT_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tif", "bmp": ".bmp"}
LONGEST_OUTPUT_EXTENSION = max(len(e) for e in OUTPUT_EXTENSIONS.values())


class UnsafeKeyError(ValueError):
    pass


def key_problem(key: str) -> str | None:
    """Why `key` cannot name a decoded file below any folder (a phrase: "has a backslash"), or None."""
    problem = relative_path_problem(key) if key else "is empty"
    if problem:
        return problem
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    *folders, name = key.split("/")
    stem = posixpath.splitext(name)[0]
    if any(len(f.encode()) > MAX_NAME_BYTES for f in folders) or len(stem.encode()) + LONGEST_OUTPUT_EXTENSION > MAX_NAME_BYTES:
        return f"has a name longer than a file name may be ({MAX_NAME_BYTES} bytes)"
    return None


def decoded_stem(key: str) -> str:
    """The part of a key that names its decoded file: all but the extension, which decode replaces."""
    return posixpath.splitext(key)[0]


def output_name(key: str, image_format: str) -> str:
    """The file a key decodes to under DST: its relative path, extension replaced by the format's. Keys may
    come from a hostile archive: one that could climb out of DST is refused (UnsafeKeyError)."""
    problem = key_problem(key)
    if problem:
        raise UnsafeKeyError(f"key {key!r} is not a safe relative path (it {problem}); refusing to write it")
    return decoded_stem(key) + OUTPUT_EXTENSIONS[image_format]


class DecodedNames:
    """The paths under DST that a set of keys decode to, to tell whether another key would clash with them.

    `extensions` are the output extensions to reckon with: all of them for what an archive may hold
    (it may be decoded to any format), one for a decode to one format.
    """

    def __init__(self, extensions=tuple(OUTPUT_EXTENSIONS.values())):
        self.extensions = tuple(extensions)
        self.stems: dict[str, str] = {}  # decoded stem → the key that has it
        self.folders: dict[str, str] = {}  # folder (a key's path prefix) → a key below it

    def clash(self, key: str) -> str | None:
        """How `key` would clash with a key already added (a phrase naming it), or None."""
        stem = decoded_stem(key)
        if stem in self.stems:
            return (f"decodes to the same file as {self.stems[stem]!r} (the keys differ only in their extension); "
                    "rename one of them")  # fmt: skip
        for extension in self.extensions:
            if stem + extension in self.folders:
                other = self.folders[stem + extension]
                return f"decodes to {stem + extension}, a folder {other!r} needs; rename one of them"
        for folder in _folders(key):
            folder_stem, extension = posixpath.splitext(folder)
            if extension in self.extensions and folder_stem in self.stems:
                return f"needs the folder {folder}, the file {self.stems[folder_stem]!r} decodes to; rename one of them"
        return None

    def add(self, key: str) -> None:
        self.stems.setdefault(decoded_stem(key), key)
        for folder in _folders(key):
            self.folders.setdefault(folder, key)

    def admit(self, key: str) -> str | None:
        """Add `key` unless it breaks the key rule; returns why it does (a phrase), or None once added."""
        problem = key_problem(key)
        if problem:
            return f"key {problem}: it cannot name a decoded file"
        clash = self.clash(key)
        if clash is None:
            self.add(key)
        return clash


def _folders(key: str) -> list[str]:
    parts = key.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
