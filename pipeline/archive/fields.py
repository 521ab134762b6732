"""Manifest fields read from JSON that may be hostile: every field's type and range checked, every path
confined to its folder, and a refusal one ArchiveError naming the field."""

from __future__ import annotations

import json
import math
import re

from ...codecs.errors import ArchiveError
from ..storage import relative_path_problem
from .layout import ARCHIVE_FORMAT_VERSION, CODEC_NAME, FAILURE_PATH, FINGERPRINT_HEX, INT64_MAX, SHA256_HEX, SHARD_PATH
from .records import CodecSpec, EmbeddedModel, Manifest, ShardEntry, legacy_spec

def archive_document(data: bytes) -> dict:
    """manifest.json (or a checkpoint) as JSON, once it says it is one of a version this diffarc reads."""
    document = parse_json(data)
    if not isinstance(document, dict) or document.get("format") != "diffarc-archive":
        raise ArchiveError("not a diffarc archive manifest")
    version = Fields(document, "").count("format_version", low=1)
    if version > ARCHIVE_FORMAT_VERSION:
        raise ArchiveError(
            f"archive format version {version} is newer than this diffarc reads ({ARCHIVE_FORMAT_VERSION}); "
            "upgrade diffarc"
        )
    return document


def parse_json(data: bytes):
    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"the number {text[:40]} is out of range")
        return value

    try:
        return json.loads(data, parse_constant=refuse_constant, parse_float=finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ArchiveError(f"manifest is not valid JSON: {exc}") from None


def show(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Fields:
    """One JSON object of a manifest, read field by field with its type and range checked."""

    def __init__(self, value, where: str):
        self.value, self.where = value, where

    def error(self, name: str, why: str) -> ArchiveError:
        return ArchiveError(f"manifest field {self.where}{name} {why}")

    def _get(self, name: str, optional: bool):
        value = self.value.get(name)
        if value is None and not optional:
            raise self.error(name, "is missing")
        return value

    def count(self, name: str, low: int = 0, optional: bool = False) -> int | None:
        value = self._get(name, optional)
        if value is None:
            return None
        if type(value) is not int or not low <= value <= INT64_MAX:  # bool is an int: not a count
            raise self.error(name, f"must be a whole number from {low} to 2^63-1, not {show(value)}")
        return value

    def number(self, name: str) -> float:
        value = self._get(name, False)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise self.error(name, f"must be a number, not {show(value)}")
        return value

    def flag(self, name: str) -> bool:
        value = self._get(name, False)
        if type(value) is not bool:
            raise self.error(name, f"must be true or false, not {show(value)}")
        return value

    def text(self, name: str, pattern: re.Pattern | None = None, default: str | None = None) -> str:
        value = self._get(name, default is not None)
        if value is None:
            return default
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            raise self.error(name, f"is not a valid value: {show(value)}")
        return value

    def path(self, name: str, pattern: re.Pattern | None = None) -> str:
        """A path relative to the archive (or to one of its folders) that cannot leave it."""
        value = self.text(name)
        problem = relative_path_problem(value)
        if problem or (pattern is not None and not pattern.fullmatch(value)):
            raise self.error(name, f"is not a path inside the archive: {show(value)}")
        return value

    def object(self, name: str, default: dict | None = None) -> dict:
        value = self._get(name, default is not None)
        if value is None:
            return default
        if not isinstance(value, dict):
            raise self.error(name, f"must be an object, not {show(value)}")
        return value

    def fields(self, name: str, optional: bool = False) -> Fields | None:
        value = self._get(name, optional)
        if value is None:
            return None
        return Fields(self.object(name), f"{self.where}{name}.")

    def each(self, name: str) -> list[Fields]:
        """The objects of a list field (a missing list is empty)."""
        value = self.value.get(name, [])
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, not {show(value)}")
        where = f"{self.where}{name}"
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise ArchiveError(f"manifest field {where}[{index}] must be an object, not {show(item)}")
        return [Fields(item, f"{where}[{index}].") for index, item in enumerate(value)]


def unique(top: Fields, name: str, values: list, what: str) -> None:
    seen = set()
    for index, value in enumerate(values):
        if value in seen:
            raise top.error(f"{name}[{index}].{what}", f"repeats an earlier entry's: {show(value)}")
        seen.add(value)


def _spec(f: Fields) -> CodecSpec:
    spec_id = f.count("id", low=1)
    if spec_id > 0xFFFF:  # a compact stream's spec id is two bytes
        raise f.error("id", f"must be at most 65535, not {spec_id}")
    return CodecSpec(f.text("name", CODEC_NAME), f.object("params"), f.text("fingerprint", FINGERPRINT_HEX, default=""),
                     id=spec_id, hint=f.object("hint", default={}))  # fmt: skip


def shard_entry(f: Fields) -> ShardEntry:
    entry = ShardEntry(
        path=f.path("path", SHARD_PATH), rows=f.count("rows", low=1), bytes=f.count("bytes", low=1),
        sha256=f.text("sha256", SHA256_HEX), first_key=f.text("first_key"), last_key=f.text("last_key"),
        source_bytes=f.count("source_bytes"), bitstream_bytes=f.count("bitstream_bytes"), pixels=f.count("pixels"),
        largest_pixels=f.count("largest_pixels", optional=True) or 0,
    )  # fmt: skip
    if entry.first_key > entry.last_key:
        raise f.error("first_key", f"comes after last_key {show(entry.last_key)}")
    return entry


def _embedded_model(f: Fields) -> EmbeddedModel:
    fingerprint = f.text("fingerprint", FINGERPRINT_HEX)
    if not fingerprint:
        raise f.error("fingerprint", "is empty")
    files = [{"path": g.path("path"), "bytes": g.count("bytes"), "sha256": g.text("sha256", SHA256_HEX)}
             for g in f.each("files")]  # fmt: skip
    return EmbeddedModel(fingerprint, files)


def _specs(top: Fields) -> list[CodecSpec]:
    specs = [_spec(f) for f in top.each("specs")]
    if not specs:
        raise top.error("specs", "is empty")
    unique(top, "specs", [s.id for s in specs], "id")
    return specs


def _models(top: Fields) -> list[EmbeddedModel]:
    models = [_embedded_model(f) for f in top.each("models")]
    unique(top, "models", [m.fingerprint for m in models], "fingerprint")
    return models


def _failure_table(top: Fields) -> dict | None:
    f = top.fields("failures", optional=True)
    if f is None:
        return None
    return {"path": f.path("path", FAILURE_PATH), "rows": f.count("rows"), "bytes": f.count("bytes"),
            "sha256": f.text("sha256", SHA256_HEX)}  # fmt: skip


# How each field of `Manifest.header` is read: from a whole manifest, or from a commit's "set".
HEADER_FIELDS = {
    "specs": _specs,
    "source": lambda top: top.text("source"),
    "complete": lambda top: top.flag("complete"),
    "created": lambda top: top.number("created"),
    "max_pixels": lambda top: top.count("max_pixels", low=1, optional=True),
    "failures": _failure_table,
    "models": _models,
}


def manifest_from_json(data: bytes) -> Manifest:
    """A whole manifest read from bytes that may be hostile: every field's type and range is checked and
    every path confined to its folder, and a refusal is one ArchiveError naming the field."""
    document = archive_document(data)
    if "log" in document:
        raise ArchiveError("manifest is the pointer to a commit log, not a whole manifest")
    top = Fields(document, "")
    if top.count("format_version", low=1) == 1:
        codec = top.fields("codec")
        header = {"specs": [legacy_spec({"name": codec.text("name", CODEC_NAME), "params": codec.object("params"),
                                         "fingerprint": codec.text("fingerprint", FINGERPRINT_HEX, default="")})],
                  "models": []}  # fmt: skip
        header.update((name, read(top)) for name, read in HEADER_FIELDS.items() if name not in header)
    else:
        header = {name: read(top) for name, read in HEADER_FIELDS.items()}
    shards = [shard_entry(f) for f in top.each("shards")]
    unique(top, "shards", [e.path for e in shards], "path")
    return Manifest(**header, shards=shards, updated=top.number("updated"), commits=top.count("commits"))
