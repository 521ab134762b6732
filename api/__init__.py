"""diffarc's Python API: archives as Ray Data datasets, and datasets written as archives.

    import diffarc
    ds = diffarc.read_archive("s3://bucket/archive")       # key, image, width, height; decoded on actors
    for row in diffarc.iter_archive("s3://bucket/archive"): ...   # the same rows, in this process
    diffarc.write_archive(ds, "s3://bucket/other", codec="jpeg")  # committed as `diffarc encode` commits

The functions live in `diffarc.pipeline.ray_data`; they are loaded on first use, so that the command line,
which imports this package too, does not pay for importing Ray Data (about a second).
"""

from __future__ import annotations

__all__ = ["read_archive", "iter_archive", "write_archive"]


def __getattr__(name: str):
    if name in __all__:
        from .pipeline import ray_data

        return getattr(ray_data, name)
    raise AttributeError(f"module 'diffarc' has no attribute {name!r}")
