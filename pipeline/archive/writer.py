"""The one writer of an archive's log: commits of shards and failures, checkpoints, and orphan cleanup."""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

from ...codecs.errors import ArchiveError
from ..keys import DecodedNames
from ..storage import Location, WriteConflict
from .fields import parse_json
from .layout import (
    ARCHIVE_FORMAT_VERSION, CHECKPOINT_EVERY, FAILURE_DIR, LAST_CHECKPOINT, LOG_COMMIT, LOG_DIR, LOG_PART, MANIFEST,
    MODEL_DIR, PART_SHARDS, SHARD_DIR, WRITTEN_FAILURES, WRITTEN_SHARD, WRITTEN_WEIGHTS, check_layout, checkpoint_path,
    commit_path, part_path, shard_parts, tool_version,
)
from .lease import WriterLease
from .log import checkpoint_pointer, log_pointer, manifest_from
from .records import CodecSpec, EmbeddedModel, Failure, Manifest, ShardEntry, codec_mismatch, part_document
from .shards import read_failures, read_shard, shard_without, write_failures

class ArchiveWriter:
    """Commits shards and failures of one encode job to an archive's log, one small conditional file each.

    It holds the archive's writer lease (`lease`, or one it takes itself) until `finish` or `close`, and
    creates commit N only if no commit N exists: a writer that lost a race for a number (one whose lease
    failed it) stops with an ArchiveError and writes nothing more, and the commit that won stands.
    Every `checkpoint_every` commits, and at `finish`, it writes a checkpoint: the whole manifest, its
    shard list in immutable parts (`shard_parts`), of which it writes only those that are new.

    Opening an existing archive resumes it: the keys it already holds are `done`, its failures are
    known, and a request for a different codec, parameters or weights is refused rather than mixed in.
    The same weights found under another path are the same weights: the job goes on, and the spec's
    hint records where they are now. An archive without a log (format 1 or 2, one whole manifest.json)
    gets one at its first commit: that commit holds the whole manifest, and only then is manifest.json
    replaced — conditionally, by the pointer to the log — so a run killed in between leaves the old archive
    as it was.
    """

    def __init__(
        self, archive: Location, codec: CodecSpec, source: str, lease: WriterLease | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY, part_shards: int = PART_SHARDS,
    ):  # fmt: skip
        self.archive = archive = archive.confined()
        check_layout(archive)  # before the lease: writer.lock may be the link
        self.checkpoint_every, self.part_shards = checkpoint_every, part_shards
        self._own_lease = lease is None
        self.lease = lease or WriterLease(archive)
        try:
            self._open(codec, source)
        except BaseException:
            self.close()
            raise

    def _open(self, codec: CodecSpec, source: str) -> None:
        try:
            data, self._manifest_version = self.archive.read_versioned(MANIFEST)
            existing, self._in_log = manifest_from(self.archive, data)
        except FileNotFoundError:
            existing, self._manifest_version, self._in_log = None, None, False
        if existing is not None and existing.codec != codec:
            raise codec_mismatch(self.archive.url, existing.codec, codec)
        # What the log already says: the next commit writes only what differs from it.
        self._logged_header = existing.header() if self._in_log else {}
        self._logged_shards = len(existing.shards) if self._in_log else 0
        # This log's checkpoints, oldest first, with the parts each names; two are kept.
        self._checkpoints: dict[int, set[str]] = {}
        self._parts_written: dict[str, dict] = {}  # this run's parts: path → its entry in a checkpoint
        self._stale_commits: list[str] = []
        if self._in_log:
            pointer = checkpoint_pointer(self.archive, 1)
            if pointer:
                self._checkpoints[pointer["commit"]] = self._parts_named_by(pointer["commit"])
        if existing is not None:
            existing.specs[-1] = replace(existing.codec, hint=codec.hint)
        self.manifest = existing or Manifest(specs=[replace(codec, id=1)], source=source)
        if not self._in_log:
            # Commits a killed run wrote before manifest.json named its log: nobody trusts them, and the log
            # starts after them rather than reusing their numbers.
            self._stale_commits = [p for p in self.archive.list_files(LOG_DIR) if LOG_COMMIT.fullmatch(p)]
            numbers = [int(LOG_COMMIT.fullmatch(p).group(1)) for p in self._stale_commits]
            self.manifest.commits = max([self.manifest.commits, *numbers])
        self.failures = read_failures(self.archive, self.manifest)
        self._failures_changed = False
        self.done: set[str] = set()

        def keys_of(entry: ShardEntry) -> list[str]:
            return read_shard(self.archive, entry, columns=["key"]).column("key").to_pylist()

        with ThreadPoolExecutor(8) as pool:  # on an object store each read mostly waits on the network
            for keys in pool.map(keys_of, self.manifest.shards):
                self.done.update(keys)
        self.names = DecodedNames()  # the key rule's record of what the archive's keys decode to
        for key in sorted(self.done):
            self.names.add(key)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop writing; the lease is given back if this writer took it."""
        if self._own_lease:
            self.lease.release()

    def commit(self, entry: ShardEntry | None, keys: list[str], failures: list[Failure]) -> None:
        """Make one finished unit of work (a shard and/or its failed items) part of the archive.

        Keys the key rule refuses (`keys.DecodedNames`: unsafe, or clashing once decoded with a key the
        archive holds) are taken out of the shard, which is written again without them, and go to the
        failure table (stage "list"): no writer stores what decode cannot give back."""
        overlap = self.done.intersection(keys)
        if overlap:  # a key in two shards would break "exactly once"; never commit that
            raise ArchiveError(f"shard {entry.path if entry else ''} repeats committed keys, e.g. {sorted(overlap)[0]}")
        refused = {key: problem for key in sorted(keys) if (problem := self.names.admit(key))}
        if refused:
            entry = shard_without(self.archive, entry, set(refused)) if entry else None
            keys = [key for key in keys if key not in refused]
            failures = [*failures, *(Failure(key, "list", problem) for key, problem in refused.items())]
        if entry is not None:
            self.manifest.shards.append(entry)
            self.done.update(keys)
            # The limit decode and verify apply is what the streams need, not what the encoder allowed.
            self.manifest.max_pixels = max(self.manifest.max_pixels or 0, entry.largest_pixels) or None
        for key in keys:
            if self.failures.pop(key, None) is not None:  # a retried item that now succeeded
                self._failures_changed = True
        for failure in failures:
            self.failures[failure.key] = failure
            self._failures_changed = True
        self._commit()

    def record_refusals(self, refused: dict[str, str]) -> None:
        """Make the failure table's "list" rows this run's listing refusals (`Listing.refused`): new ones
        added, and those the listing no longer refuses (renamed, gone) dropped, so a plain re-run encodes
        them. Keys already encoded are left alone (archived before a listing rule existed)."""
        wanted = {key: Failure(key, "list", reason) for key, reason in refused.items() if key not in self.done}
        current = {key: f for key, f in self.failures.items() if f.stage == "list"}
        if wanted == current:
            return
        for key in current.keys() - wanted.keys():
            del self.failures[key]
        self.failures.update(wanted)
        self._failures_changed = True
        self._commit()

    def add_model(self, model: EmbeddedModel) -> None:
        """List embedded weights whose files are all written (see `embed_weights`)."""
        self.manifest.models = [m for m in self.manifest.models if m.fingerprint != model.fingerprint] + [model]
        self._commit()

    def finish(self) -> Manifest:
        self.manifest.complete = True
        self._commit()
        self._remove_orphans()
        self.close()
        return self.manifest

    def _commit(self) -> None:
        """One commit file: the header fields that changed and the shards added since the last commit. The
        failure table, O(failures), is rewritten only by a commit that changes it."""
        self.lease.check()
        number = self.manifest.commits + 1
        previous = self.manifest.failures
        if self._failures_changed:
            self.manifest.failures = write_failures(self.archive, self.failures, number)
        self.manifest.updated = time.time()
        header = self.manifest.header()
        record = {
            "format": "diffarc-archive-commit", "format_version": ARCHIVE_FORMAT_VERSION,
            "tool_version": tool_version(), "commit": number, "time": self.manifest.updated,
            "set": {k: v for k, v in header.items() if k not in self._logged_header or self._logged_header[k] != v},
            "add_shards": [asdict(s) for s in self.manifest.shards[self._logged_shards:]],
        }  # fmt: skip
        try:
            self._write_once(commit_path(number), json.dumps(record).encode("utf-8"), None)
            if not self._in_log:  # the first commit of the log; the archive's manifest.json names it from now on
                self._write_once(MANIFEST, log_pointer(number), self._manifest_version)
                self._in_log = True
        except WriteConflict:
            raise ArchiveError(
                f"{self.archive.url}: another writer committed since this job read the archive (commit {number} "
                "exists, or the manifest changed); this job stopped without overwriting anything (nothing either "
                "job committed is lost): run encode again to resume"
            ) from None
        self.manifest.commits = number
        self._logged_header, self._logged_shards = header, len(self.manifest.shards)
        self._failures_changed = False
        if number % self.checkpoint_every == 0 or self.manifest.complete:
            self._checkpoint()
        if previous and previous["path"] != (self.manifest.failures or {}).get("path"):
            self.archive.delete(previous["path"])

    def _write_once(self, relative: str, data: bytes, expected: str | None) -> None:
        """`write_versioned`, where a conflict with exactly these bytes is this writer's own write: a write
        whose answer was lost (a connection cut after the store had it) is retried, and then finds itself."""
        try:
            self.archive.write_versioned(relative, data, expected)
        except WriteConflict:
            try:
                if self.archive.read(relative) == data:
                    return
            except FileNotFoundError:
                pass
            raise

    def _checkpoint(self) -> None:
        """The whole manifest as of the last commit, its shard list in parts, all written before the pointer
        names them. The checkpoint before stays (with its parts) for readers that read the older pointer;
        older ones, and parts only they named, are deleted."""
        number = self.manifest.commits
        parts = []
        for start, end in shard_parts(len(self.manifest.shards), self.part_shards):
            path = part_path(start, end)
            if path not in self._parts_written:  # a part is immutable: once written by this run, it stays
                data = part_document(start, self.manifest.shards[start:end])
                self.archive.write_atomic(path, data)
                self._parts_written[path] = {"path": path, "start": start, "end": end, "bytes": len(data),
                                             "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
            parts.append(self._parts_written[path])
        data = self.manifest.to_json(shard_parts=parts)
        self.archive.write_atomic(checkpoint_path(number), data)
        pointer = {"commit": number, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.archive.write_atomic(LAST_CHECKPOINT, json.dumps(pointer).encode())
        self._checkpoints.pop(number, None)
        self._checkpoints[number] = {part["path"] for part in parts}
        while len(self._checkpoints) > 2:
            oldest = next(iter(self._checkpoints))
            named = self._checkpoints.pop(oldest)
            self.archive.delete(checkpoint_path(oldest))
            for path in named - set().union(*self._checkpoints.values()):
                self.archive.delete(path)
                self._parts_written.pop(path, None)

    def _parts_named_by(self, number: int) -> set[str]:
        """The part files checkpoint `number` (written by an earlier run) names; none if it cannot be read."""
        try:
            document = parse_json(self.archive.read(checkpoint_path(number)))
        except (FileNotFoundError, ArchiveError):
            return set()
        named = document.get("shard_parts") if isinstance(document, dict) else None
        return {p["path"] for p in named or [] if isinstance(p, dict) and LOG_PART.fullmatch(str(p.get("path")))}

    def _remove_orphans(self) -> None:
        """Shards, failure tables or model files from a killed run that no manifest lists: nobody trusts them.
        Only regular files inside the archive (its listing follows no link) with the names this diffarc
        gives what it writes are removed: model files only in the folder of one of the archive's own
        fingerprints."""
        for path in self._stale_commits:  # before the log's first commit: no pointer leads to them
            self.archive.delete(path)
        named = set().union(*self._checkpoints.values())
        for path in self.archive.list_files(LOG_DIR):
            if LOG_PART.fullmatch(path) and path not in named:  # parts of checkpoints a killed run left
                self.archive.delete(path)
        listed = {s.path for s in self.manifest.shards}
        if self.manifest.failures:
            listed.add(self.manifest.failures["path"])
        for directory, pattern in ((SHARD_DIR, WRITTEN_SHARD), (FAILURE_DIR, WRITTEN_FAILURES)):
            for path in self.archive.list_files(directory):
                if path not in listed and pattern.fullmatch(path):
                    self.archive.delete(path)
        model_files = {f"{m.folder}/{f['path']}" for m in self.manifest.models for f in m.files}
        ours = {spec.fingerprint for spec in self.manifest.specs if spec.fingerprint}
        for path in self.archive.list_files(MODEL_DIR):
            written = WRITTEN_WEIGHTS.fullmatch(path)
            if path not in model_files and written and written.group(1) in ours:
                self.archive.delete(path)
