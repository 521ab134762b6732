"""A `diffarc bench` run's curves against any one of its curves: BD-rates, and each point's PSNR and LPIPS
against that curve's at the same bpp.

`diffarc bench` takes BD-rates against one --reference; a codec judged against two baselines (AVIF and
AVIF + grain) needs the second from the same run. This reads the run's results.json and prints, for each
other curve, its BD-rates (PSNR, MS-SSIM, LPIPS) against the curve named by --against, then each point's
ΔPSNR (dB) and ΔLPIPS (%) against that curve interpolated at the point's bpp (linear in log bpp; points
outside its range are left out).

    python benchmarks/bench_against.py bench-out/results.json --against "avif:grain=2,quality=0|5|10|20|35"
    python benchmarks/bench_against.py bench-avif/results.json bench-ddcm/results.json --against avif
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from diffarc.pipeline.bench.run import bd_rates


def at_bpp(curve: dict, bpp: float, metric: str) -> float | None:
    """The curve's metric at `bpp`, linear in log bpp between its points; None outside them."""
    points = sorted(curve["points"], key=lambda p: p["bpp"])
    rates = [math.log(p["bpp"]) for p in points]
    if not rates[0] <= math.log(bpp) <= rates[-1]:
        return None
    return float(np.interp(math.log(bpp), rates, [p[metric] for p in points]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="a bench run's results.json; several: their curves together "
                        "(runs on the same images, e.g. one per codec)")
    parser.add_argument("--against", required=True, help="the curve's name, as the run lists it")
    args = parser.parse_args()
    runs = [json.loads(open(path).read()) for path in args.results]
    curves = {c["name"]: c for run in runs for c in run["curves"]}
    if args.against not in curves:
        raise SystemExit(f"no curve {args.against!r}; the run has {sorted(curves)}")
    against = curves[args.against]
    others = [c for name, c in curves.items() if name != args.against]
    with_lpips = all(p.get("lpips") is not None for c in curves.values() for p in c["points"])
    for name, entry in bd_rates(others, against, with_lpips).items():
        shown = ", ".join(f"{m} {v:+.1f} %" if v is not None else f"{m} –" for m, v in entry.items() if m != "interpolation")
        print(f"BD-rate of {name} against {args.against}: {shown}")
    for curve in others:
        for point in curve["points"]:
            psnr, lpips = at_bpp(against, point["bpp"], "psnr"), at_bpp(against, point["bpp"], "lpips") if with_lpips else None
            if psnr is None:
                continue
            lpips_change = f", LPIPS {point['lpips']:.3f} vs {lpips:.3f} ({100 * (point['lpips'] / lpips - 1):+.1f} %)" if lpips else ""
            print(f"{curve['name']} {point['label']}: {point['bpp']:.4f} bpp, PSNR {point['psnr']:.2f} vs {psnr:.2f} "
                  f"({point['psnr'] - psnr:+.2f} dB){lpips_change}")  # fmt: skip


if __name__ == "__main__":
    main()
