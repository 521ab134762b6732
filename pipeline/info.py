"""What an archive holds and what it saves, from its manifest and two cheap columns of each shard."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .archive import read_failures, read_shard, require_manifest
from .preflight import check_reachable
from .storage import Location

GB = 1e9  # storage is priced per decimal gigabyte


def archive_info(archive_url: str, price_per_gb_month: float = 0.023, storage_options: dict | None = None) -> dict:
    """Counts, sizes, ratio, bpp distribution, codec and model, failures, and the monthly saving.

    The default price is S3 Standard's first tier in us-east-1 (USD per GB-month).
    """
    archive = Location(archive_url, storage_options)
    check_reachable(archive, "read the archive")  # exists() alone would call a missing bucket no archive
    manifest = require_manifest(archive)
    totals = manifest.totals
    bpp = []
    for entry in manifest.shards:
        table = read_shard(archive, entry, columns=["bitstream_bytes", "width", "height"])
        sizes = table.column("bitstream_bytes").to_numpy()
        pixels = table.column("width").to_numpy().astype(np.int64) * table.column("height").to_numpy()
        bpp.append(8 * sizes / pixels)
    bpp = np.concatenate(bpp) if bpp else np.zeros(0)
    failures = read_failures(archive, manifest)
    # Embedded weights (encode --embed-model) are stored too: they count against the saving.
    stored = totals["archive_bytes"] + (manifest.failures or {}).get("bytes", 0) + totals["model_bytes"]
    source_cost = totals["source_bytes"] / GB * price_per_gb_month
    archive_cost = stored / GB * price_per_gb_month
    return {
        "archive": archive_url,
        "complete": manifest.complete,
        "codec": manifest.codec.name,
        "params": manifest.codec.params,
        "model_fingerprint": manifest.codec.fingerprint or None,
        "model_embedded": manifest.embedded_model(manifest.codec.fingerprint) is not None,
        "model_hint": manifest.codec.hint or None,  # where the weights were when encoding
        "items": totals["items"],
        "failed": len(failures),
        "failures_by_stage": dict(Counter(f.stage for f in failures.values())),
        "shards": totals["shards"],
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
