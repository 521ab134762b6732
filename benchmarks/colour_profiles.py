"""How far a decoded picture is from what a colour-managed viewer shows of its source, for sources with a
Display P3 or an Adobe RGB profile: CIEDE2000 before colour management (the loader ignored profiles) and after.

    python benchmarks/colour_profiles.py [FOLDER] [--codec hfd --codec avif] [--limit N]

Sources: each image of FOLDER (default the Kodak set in ../shared/data/kodak; the script says so and stops
when it is absent), an sRGB picture, re-expressed in the wide space (its colours unchanged) and saved as a
JPEG of quality 95 carrying that space's ICC profile (tests/colour_spaces.py builds the profiles from the
spaces' definitions): what a phone or a camera set to Adobe RGB writes.
Reference: the source JPEG's pixels (as Pillow decodes them) read through its profile, in floating point:
what a colour-managed viewer shows. Each decoded picture is read as sRGB, as PNGs without a profile are.
- before: the source's pixels handed to the codec as they are (the loader before colour management).
- after: the pipeline's loader (`load_picture`), which converts the profile's colours to sRGB.
- `loaded`: no codec, the loaded picture itself: what the loader alone costs.
ΔE2000 is over every pixel of every image: mean and 95th percentile; ΔE76 (Euclidean CIELAB) mean beside it.
Codecs are named as for the bench (NAME, NAME:PRESET or NAME:K=V,…); default: the default codec and avif.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/colour_spaces.py: the profiles and the colour arithmetic

from diffarc.codecs.registry import DEFAULT_CODEC, create_codec  # noqa: E402
from diffarc.pipeline.bench.specs import parse_codec_spec  # noqa: E402
from diffarc.pipeline.images import load_picture  # noqa: E402
from diffarc.pipeline.sources import is_image_name  # noqa: E402
from tests.colour_spaces import ADOBE_RGB, DISPLAY_P3, SRGB, delta_e_2000, xyz_to_lab  # noqa: E402

DEFAULT_FOLDER = ROOT.parent / "shared" / "data" / "kodak"


def source_jpeg(srgb: np.ndarray, space) -> bytes:
    pixels = np.clip(np.rint(space.from_xyz_d50(SRGB.xyz_d50(srgb))), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, icc_profile=space.icc())
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--codec", action="append", help=f"codec spec (default: {DEFAULT_CODEC} and avif)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not there: give a folder of images (the Kodak set is ../shared/data/kodak)")
    files = sorted(p for p in folder.iterdir() if is_image_name(p.name))[: args.limit]
    codecs = {"loaded": None}
    for spec in args.codec or [DEFAULT_CODEC, "avif"]:
        point = parse_codec_spec(spec).points[0]
        codecs[spec] = create_codec(point.codec, point.params)

    differences: dict[tuple[str, str, str], list[np.ndarray]] = {}
    for path in files:
        srgb = load_picture(path.read_bytes()).pixels
        for space in (DISPLAY_P3, ADOBE_RGB):
            jpeg = source_jpeg(srgb, space)
            with Image.open(io.BytesIO(jpeg)) as image:
                as_stored = np.asarray(image.convert("RGB"))
            viewed = xyz_to_lab(space.xyz_d50(as_stored))
            inputs = {"before": as_stored, "after": load_picture(jpeg).pixels}
            for name, codec in codecs.items():
                for when, pixels in inputs.items():
                    decoded = pixels if codec is None else codec.decode(codec.encode([pixels]))[0]
                    lab = xyz_to_lab(SRGB.xyz_d50(decoded))
                    differences.setdefault((space.name, name, when), []).append(
                        np.stack([delta_e_2000(viewed, lab).ravel(), np.linalg.norm(viewed - lab, axis=-1).ravel()])
                    )
        print(f"{path.name} done", file=sys.stderr, flush=True)

    print(f"{len(files)} images of {folder}, sources JPEG q95 with an ICC profile; ΔE against the colour-managed view")
    print(f"{'source profile':<18} {'codec':<24} {'before: ΔE00 mean / p95, ΔE76 mean':<38} after: ΔE00 mean / p95, ΔE76 mean")
    for space in (DISPLAY_P3, ADOBE_RGB):
        for name in codecs:
            cells = []
            for when in ("before", "after"):
                e00, e76 = np.concatenate(differences[(space.name, name, when)], axis=1)
                cells.append(f"{e00.mean():5.2f} / {np.percentile(e00, 95):5.2f}, {e76.mean():5.2f}")
            print(f"{space.name:<18} {name:<24} {cells[0]:<38} {cells[1]}")


if __name__ == "__main__":
    main()
