"""The archive: Parquet shards of bitstreams, a failure table, and a manifest kept as a log of commits.

    ARCHIVE/
      manifest.json                       where a reader starts: the log's pointer (or, in archives written
                                          before the log, the whole manifest); written once
      _log/<20 digits>.json               one small file per commit: what it changed and the shards it added
      _log/<20 digits>.checkpoint.json    every CHECKPOINT_EVERY commits (and at the end), the whole manifest
                                          but its shard list, which it names in parts:
      _log/shards-<12 digits>-<12 digits>.json  the shard list's entries [start, end): immutable parts
      _log/_last_checkpoint.json          the newest checkpoint's number, size and SHA-256
      shards/part-<uuid>.parquet          one row per image, keys sorted; listed by a commit once committed
      failures/failures-<n>-<hex>.parquet every item that could not be encoded, with stage and reason
      models/<fingerprint>/               the weights the streams need, when encoded with --embed-model
      writer.lock                         held by the one encode writing the archive (lease.py)

A commit costs one small file whatever the archive's size: commit N is created only if no file of its number
exists (S3: If-None-Match: *, local disk: a hard link), so two writers can never both win a number, and the
loser stops without writing anything more. A shard (or a model folder) is written whole before a commit names
it, so a crash leaves either the previous commit (and orphan files nobody trusts, removed when the job finishes)
or the new one. One writer at a time also holds the archive's lease. A reader reads the checkpoint the pointer
names, then the commits after it up to the first number that does not exist; commits are the truth and are
never deleted, so a checkpoint that is missing, damaged or half-written is passed over and the log replayed
from its first commit instead.

An archive may come from anywhere: a manifest, checkpoint or commit has the type and range of every field
checked and every path confined to its folder before anything is read, and `read_shard` checks a shard against
its manifest entry (size, and SHA-256 when it reads it whole, row count, schema, no nulls) before trusting it.

Shards hold streams in the container's compact framing: the codec, parameters and fingerprint they
share are listed once, in the manifest's spec table, and `Manifest.expand` turns a stream read from a
shard back into the full, standalone stream the codec wrote. Archives written before the table
(format version 1) hold full streams, which `expand` returns as they are.
docs/FORMAT.md documents all of this for readers outside diffarc.

One role a module:

    layout.py   where everything lives and the names and formats of its files
    records.py  what an archive records: CodecSpec, ShardEntry, Failure, EmbeddedModel, the Manifest
    fields.py   manifest fields read from hostile JSON, each type- and range-checked
    log.py      the manifest as a log of commits with checkpoints: reading the newest manifest
    shards.py   the Parquet files (shards, failure table): written whole, read checked and memory-bounded
    models.py   weights embedded in the archive
    lease.py    the one writer's lock
    writer.py   ArchiveWriter: commits, checkpoints, the key rule at every commit, orphan cleanup
    reader.py   ArchiveReader: the archive opened once for reading, the one way every reader reads it
"""

from ...codecs.errors import ArchiveError
from .layout import (
    ARCHIVE_FORMAT_VERSION, BYTE_EXACT, CHECKPOINT_EVERY, FAILURE_SCHEMA, FIDELITIES, LAST_CHECKPOINT, LOSSY, MANIFEST,
    PART_SHARDS, PIXEL_EXACT, SHARD_SCHEMA, SHARD_SCHEMA_BEFORE_FIDELITY, check_layout, checkpoint_path, commit_path,
    part_path, shard_parts, tool_version,
)
from .lease import WriterLease, current_writer, describe_holder
from .log import load_manifest, require_manifest
from .models import check_embedded_weights, embed_weights, local_weights_folder
from .reader import ArchiveReader, ShardStreams
from .records import CodecSpec, EmbeddedModel, EncodedItem, Failure, Manifest, ShardEntry, codec_mismatch
from .shards import read_failure_table, read_failures, read_parquet, read_shard, write_shard
from .writer import ArchiveWriter

__all__ = [
    "ARCHIVE_FORMAT_VERSION", "BYTE_EXACT", "CHECKPOINT_EVERY", "FAILURE_SCHEMA", "FIDELITIES", "LAST_CHECKPOINT", "LOSSY",
    "MANIFEST", "PART_SHARDS", "PIXEL_EXACT", "SHARD_SCHEMA", "SHARD_SCHEMA_BEFORE_FIDELITY", "ArchiveError",
    "ArchiveReader", "ArchiveWriter", "CodecSpec", "EmbeddedModel", "EncodedItem", "Failure", "Manifest", "ShardEntry",
    "ShardStreams", "WriterLease", "check_embedded_weights", "check_layout", "checkpoint_path", "codec_mismatch",
    "commit_path", "current_writer", "describe_holder", "embed_weights", "load_manifest", "local_weights_folder",
    "part_path", "read_failure_table", "read_failures", "read_parquet", "read_shard", "require_manifest", "shard_parts",
    "tool_version", "write_shard",
]  # fmt: skip
