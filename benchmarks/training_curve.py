"""A training run's progress lines as a curve: one metric against the step, printed and drawn as a PNG.

    python benchmarks/training_curve.py /tmp/unet.log --field "val x0-MSE" --out docs/models/taef2-unet-curve.png

Reads the lines `diffarc train` prints ("[what] step N/M, loss L, <field> V, …"), keeps the last value
per step (Ray repeats some lines), and prints step, loss and the field. Several logs (a run and its
resumes, or two runs to compare) may be given; each is one line in the plot, labelled by its file name
or by --labels. A run started from another's weights (`--init`) counts its steps from 0: --offsets adds
the steps its weights had already taken.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def read_curve(path: Path, field: str, offset: int = 0) -> dict[int, tuple[float, float]]:
    """{step + offset: (loss, field value)} from one log."""
    pattern = re.compile(rf"step (\d+)/\d+, loss ([\d.e+-]+), .*?{re.escape(field)} ([\d.e+-]+)")
    curve = {}
    for line in path.read_text(errors="replace").splitlines():
        if match := pattern.search(line):
            curve[offset + int(match.group(1))] = (float(match.group(2)), float(match.group(3)))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--field", default="val x0-MSE", help="the progress field to plot (default: %(default)s)")
    parser.add_argument("--labels", default=None, help="comma-separated labels, one per log")
    parser.add_argument("--offsets", default=None, help="comma-separated steps added to each log's (default: 0)")
    parser.add_argument("--out", default=None, help="PNG to write (default: print only)")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [path.stem for path in args.logs]
    offsets = [int(o) for o in args.offsets.split(",")] if args.offsets else [0] * len(args.logs)
    curves: dict[str, dict] = {}
    for label, path, offset in zip(labels, args.logs, offsets, strict=True):
        curves.setdefault(label, {}).update(read_curve(path, args.field, offset))  # a label's logs: one line
    for label, curve in curves.items():
        print(f"{label}:  step  loss  {args.field}")
        for step in sorted(curve):
            print(f"  {step:6d}  {curve[step][0]:.4f}  {curve[step][1]:.4f}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for label, curve in curves.items():
            steps = sorted(curve)
            axis.plot(steps, [curve[s][1] for s in steps], marker="o", label=label)
        axis.set_xlabel("step")
        axis.set_ylabel(args.field)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
