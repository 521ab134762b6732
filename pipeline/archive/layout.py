"""Where everything lives in an archive, and the names and formats its files have (docs/FORMAT.md)."""

from __future__ import annotations

import functools
import re
from importlib.metadata import version

import pyarrow as pa

from ...codecs.errors import ArchiveError
from ..storage import LinkRefused, Location

# 3: the manifest as a log of commits with checkpoints. 2: streams in compact framing, the spec table,
# models/. Version 1 and 2 archives (one whole manifest.json) are read as they are, and resuming one
# starts its log (see ArchiveWriter).
ARCHIVE_FORMAT_VERSION = 3
MANIFEST = "manifest.json"
LOG_DIR = "_log"
LAST_CHECKPOINT = f"{LOG_DIR}/_last_checkpoint.json"
# A checkpoint is written once per this many commits; a reader reads at most this many small commit files
# after it.
CHECKPOINT_EVERY = 100
# A checkpoint's shard list is cut into parts at multiples of PART_SHARDS · 2^k (`shard_parts`). A part, once
# whole, never changes, so a checkpoint rewrites only the parts that grew: about PART_SHARDS entries, plus
# one merged part each time the count crosses a boundary. Every entry is written O(log shards) times in a
# job, instead of once per checkpoint (O(shards²) bytes for a job), and a reader reads O(log shards) parts.
PART_SHARDS = 128
LOG_COMMIT = re.compile(r"_log/(\d{20})\.json")
LOG_PART = re.compile(r"_log/shards-(\d{12})-(\d{12})\.json")
SHARD_DIR = "shards"
FAILURE_DIR = "failures"
MODEL_DIR = "models"
DEFAULT_ROW_GROUP_BYTES = 8 << 20
# Shards written before diffarc recorded what it promises about each item hold these columns alone.
SHARD_SCHEMA_BEFORE_FIDELITY = pa.schema(
    [
        ("key", pa.string()),
        ("bitstream", pa.binary()),
        ("bitstream_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source_bytes", pa.int64()),
        ("source_sha256", pa.string()),
        ("codec", pa.string()),
    ]
)
# What the archive promises about each item (docs/FORMAT.md): the source's format, its colour profile and
# whether the pixels were converted from it, and the item's fidelity. Older shards read as FIDELITY_UNKNOWN.
FIDELITY_FIELDS = [
    ("source_format", pa.string()),
    ("source_profile", pa.string()),
    ("colour_converted", pa.bool_()),
    ("fidelity", pa.string()),
]
SHARD_SCHEMA = pa.schema([*SHARD_SCHEMA_BEFORE_FIDELITY, *FIDELITY_FIELDS])
BYTE_EXACT, PIXEL_EXACT, LOSSY = FIDELITIES = ("byte-exact", "pixel-exact", "lossy")  # an item's fidelity, best first
FIDELITY_UNKNOWN = {"source_format": "", "source_profile": "", "colour_converted": False, "fidelity": LOSSY}
FAILURE_SCHEMA = pa.schema([("key", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
# What a manifest may name: one file directly in its folder, with a name diffarc could have written.
SHARD_PATH = re.compile(r"shards/[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")
FAILURE_PATH = re.compile(r"failures/[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")
# The names this diffarc gives the files it writes: orphan cleanup deletes nothing else.
WRITTEN_SHARD = re.compile(r"shards/part-[0-9a-f]{32}\.parquet")
WRITTEN_FAILURES = re.compile(r"failures/failures-\d{6,}-[0-9a-f]{8}\.parquet")
WRITTEN_WEIGHTS = re.compile(r"models/([0-9a-f]+)/(?:[A-Za-z0-9_.-]+/)*[A-Za-z0-9_.-]+\.(?:json|safetensors)")
# What an archive holds at its top: none of it may be a link (`check_layout`).
LAYOUT = ("manifest.json", "_log", "shards", "failures", "models", "writer.lock")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FINGERPRINT_HEX = re.compile(r"(?:[0-9a-f]{2}){0,255}")  # the container's fingerprint is at most 255 bytes
CODEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
INT64_MAX = 2**63 - 1


def check_layout(archive: Location) -> None:
    """Refuse (ArchiveError) an archive whose top-level entries include a symbolic link: a writer that
    followed one would write or delete outside the archive."""
    for name in LAYOUT:
        try:
            archive.confined().path(name)
        except LinkRefused as exc:
            raise ArchiveError(str(exc)) from None


def commit_path(number: int) -> str:
    return f"{LOG_DIR}/{number:020d}.json"


def checkpoint_path(number: int) -> str:
    return f"{LOG_DIR}/{number:020d}.checkpoint.json"


def part_path(start: int, end: int) -> str:
    return f"{LOG_DIR}/shards-{start:012d}-{end:012d}.json"


def shard_parts(count: int, block: int = PART_SHARDS) -> list[tuple[int, int]]:
    """[start, end) ranges cutting a shard list of `count` entries into checkpoint parts: the largest runs
    of `block` · 2^k entries aligned to their own size, then what is left (fewer than `block` entries).
    The same count always gives the same parts, and a part of a shorter list either reappears whole in a
    longer one or is merged into a bigger block there."""
    blocks, parts, start = count // block, [], 0
    for k in reversed(range(blocks.bit_length())):
        if blocks >> k & 1:
            end = start + block * (1 << k)
            parts.append((start, end))
            start = end
    if start < count:
        parts.append((start, count))
    return parts


@functools.cache  # importlib.metadata scans the installed packages: ~20 ms, once per commit otherwise
def tool_version() -> str:
    return version("diffarc")
