"""Bytes each stream spends on framing, and the mean bpp of standalone streams next to archive streams.

    python benchmarks/stream_overhead.py [FOLDER] --codec ddcm:0.02bpp
    python benchmarks/stream_overhead.py [FOLDER] --codec avif

Each image is loaded by the pipeline's loader and encoded once. Three sizes are reported per stream:
- `legacy`: the full framing as diffarc wrote it before weight locations left the parameters (the
  codec's whole config, `model=…` included, in every stream);
- `standalone`: the full framing `Codec.encode` returns now (`cat --stream` exports it);
- `archive`: the compact framing an archive's shards hold (`container.compact`, as `write_shard` does).
`--codec` takes one point of the bench's spec grammar: NAME (its defaults), NAME:PRESET or NAME:K=V,…. FOLDER
defaults to the Kodak set in ../shared/data/kodak; the script says so and stops when it is absent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from diffarc.codecs import container
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.bench.specs import parse_codec_spec
from diffarc.pipeline.images import load_rgb
from diffarc.pipeline.sources import is_image_name

DEFAULT_FOLDER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak"


def stream_sizes(codec, image: np.ndarray) -> dict[str, int]:
    stream = codec.encode([image])[0]
    header, payload = container.unpack(stream)
    legacy = container.pack(container.Header(codec.name, codec.config, header.fingerprint, header.width, header.height), payload)
    compact = container.compact(stream, 1, header.spec)
    return {"payload": len(payload), "legacy": len(legacy), "standalone": len(stream), "archive": len(compact)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--codec", default="avif", help="one point: NAME, NAME:PRESET or NAME:K=V,…")
    args = parser.parse_args()

    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"no images at {folder} (the Kodak set lives in ../shared/data/kodak); nothing measured")
        return
    if ":" in args.codec:
        curve = parse_codec_spec(args.codec)
        if len(curve.points) != 1:
            parser.error(f"--codec {args.codec!r} is {len(curve.points)} points; name one preset or parameters")
        name, label, params = curve.points[0].codec, curve.points[0].label, curve.points[0].params
    else:
        name, label, params = args.codec, "defaults", {}
    codec = create_codec(name, params)
    files = sorted(p for p in folder.iterdir() if is_image_name(p.name))
    rows, started = [], time.perf_counter()
    for path in files:
        image = load_rgb(path.read_bytes())
        rows.append({**stream_sizes(codec, image), "pixels": image.shape[0] * image.shape[1]})
    seconds = time.perf_counter() - started

    def mean_bpp(kind: str) -> float:
        return float(np.mean([8 * r[kind] / r["pixels"] for r in rows]))

    def mean_overhead(kind: str) -> float:
        return float(np.mean([r[kind] - r["payload"] for r in rows]))

    print(f"{name} {label} on {len(rows)} images of {folder} ({seconds:.1f} s)")
    print(f"{'framing':<11} {'overhead B':>10} {'mean bpp':>9}  change")
    for kind in ("legacy", "standalone", "archive"):
        change = (mean_bpp(kind) / mean_bpp("legacy") - 1) * 100
        print(f"{kind:<11} {mean_overhead(kind):>10.1f} {mean_bpp(kind):>9.5f}  {change:+.1f} %")
    print(f"payload only{'':>10} {mean_bpp('payload'):>9.5f}")


if __name__ == "__main__":
    main()
