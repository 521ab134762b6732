"""What an archive holds and what it saves, from its manifest and a few cheap columns of each shard.

Counts and sizes are the shards' own (a manifest may have been edited); a shard that does not match its
manifest entry is left out of them and named under `problems`, for `diffarc verify` to look into.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..codecs.errors import ArchiveError
from .archive import FIDELITIES, ArchiveReader, current_writer
from .storage import Location

GB = 1e9  # storage is priced per decimal gigabyte
INFO_COLUMNS = ["bitstream_bytes", "width", "height", "source_bytes", "fidelity", "colour_converted"]


def archive_info(archive_url: str, price_per_gb_month: float = 0.023, storage_options: dict | None = None) -> dict:
    """Counts, sizes, ratio, bpp distribution, codec and model, failures, and the monthly saving.

    The default price is S3 Standard's first tier in us-east-1 (USD per GB-month).
    """
    # The writer is looked up before the manifest is read (again): an encode that finishes in between then
    # shows as complete, never as stopped (incomplete, with nobody writing).
    writer = current_writer(Location(archive_url, storage_options, follow_links=False))
    reader = ArchiveReader.open(archive_url, storage_options, known_codec=False)
    manifest = reader.manifest
    totals = {"items": 0, "shards": 0, "source_bytes": 0, "bitstream_bytes": 0, "archive_bytes": 0}
    bpp, problems = [], []
    fidelity, converted = Counter(), 0
    for entry in manifest.shards:
        try:  # the file's size and row count are checked against the entry; sums come from the rows
            table = reader.read(entry, INFO_COLUMNS)
        except ArchiveError as exc:
            problems.append(str(exc))
            continue
        sizes = table.column("bitstream_bytes").to_numpy()
        pixels = table.column("width").to_numpy().astype(np.int64) * table.column("height").to_numpy()
        if (pixels <= 0).any():
            problems.append(f"{entry.path}: {int((pixels <= 0).sum())} rows say their image has no pixels")
        bpp.append(8 * sizes[pixels > 0] / pixels[pixels > 0])
        totals["items"] += table.num_rows
        totals["shards"] += 1
        totals["source_bytes"] += int(table.column("source_bytes").to_numpy().sum())
        totals["bitstream_bytes"] += int(sizes.sum())
        totals["archive_bytes"] += entry.bytes
        fidelity.update(table.column("fidelity").to_pylist())
        converted += table.column("colour_converted").to_pylist().count(True)
    bpp = np.concatenate(bpp) if bpp else np.zeros(0)
    try:
        failures = reader.failures()
    except ArchiveError as exc:
        problems.append(str(exc))
        failures = {}
    model_bytes = sum(m.bytes for m in manifest.models)
    # Embedded weights (encode --embed-model) are stored too: they count against the saving.
    stored = totals["archive_bytes"] + (manifest.failures or {}).get("bytes", 0) + model_bytes
    source_cost = totals["source_bytes"] / GB * price_per_gb_month
    archive_cost = stored / GB * price_per_gb_month
    return {
        "archive": archive_url,
        "complete": manifest.complete,
        "writing": None if manifest.complete else writer,  # the encode writing it now
        "codec": manifest.codec.name,
        "params": manifest.codec.params,
        "model_fingerprint": manifest.codec.fingerprint or None,
        "model_embedded": manifest.embedded_model(manifest.codec.fingerprint) is not None,
        "model_hint": manifest.codec.hint or None,  # where the weights were when encoding
        "items": totals["items"],
        "failed": len(failures),
        "failures_by_stage": dict(Counter(f.stage for f in failures.values())),
        # What the archive gives back (docs/FORMAT.md): the source file, its picture exactly, or a picture near it.
        "fidelity": {kind: fidelity[kind] for kind in FIDELITIES},
        "colour_converted": converted,  # items whose pixels were converted from their embedded profile to sRGB
        "shards": totals["shards"],
        "problems": problems,
        "source_bytes": totals["source_bytes"],
        "bitstream_bytes": totals["bitstream_bytes"],
        "archive_bytes": stored,
        "ratio": totals["source_bytes"] / stored if stored else None,
        "bpp": _distribution(bpp),
        "price_per_gb_month": price_per_gb_month,
        "cost_source_per_month": source_cost,
        "cost_archive_per_month": archive_cost,
        "saved_per_month": source_cost - archive_cost,
        "tool": {"created": manifest.created, "updated": manifest.updated, "commits": manifest.commits},
    }


def _distribution(values: np.ndarray) -> dict | None:
    if not len(values):
        return None
    p5, p25, p50, p75, p95 = np.percentile(values, [5, 25, 50, 75, 95])
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        "p5": float(p5),
        "p25": float(p25),
        "median": float(p50),
        "p75": float(p75),
        "p95": float(p95),
        "max": float(values.max()),
    }
