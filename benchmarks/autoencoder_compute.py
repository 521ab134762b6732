"""What training compute buys the built-in autoencoder: latent channels, width and steps, on Kodak.

Each run is `diffarc train autoencoder` with the shipped recipe (96-px crops, batch 6, L1 + 0.1 · LPIPS-squeeze,
lr 1e-3 with the loop's warm-down) and one thing changed: the config (`small`, the shipped layout;
`small-8ch`, its latent at 8 channels; `wide`, twice its width) or the number of steps. Every run is then
measured by benchmarks/autoencoder_kodak.py on the 24 Kodak images at full size (never trained on).

    python benchmarks/autoencoder_compute.py                                   # the default runs, in ./runs/
    python benchmarks/autoencoder_compute.py --runs small:600,wide:600 --work-dir /tmp/ae

A finished run (its output folder exists) is measured again without retraining, so a killed script resumes
where it stopped; `diffarc train` resumes a killed run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from diffarc.codecs.parts.models import parameter_count

SHARED = Path(__file__).resolve().parents[2] / "shared"
HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="small:600,small-8ch:600,wide:600,small:1200",
                        help="comma-separated CONFIG:STEPS (default: %(default)s)")
    parser.add_argument("--data", default=str(SHARED / "data" / "train"))
    parser.add_argument("--kodak", default=str(SHARED / "data" / "kodak"))
    parser.add_argument("--lpips-weights", default=str(SHARED / "weights" / "lpips-squeeze" / "lpips_squeeze_v0.1.safetensors"))
    parser.add_argument("--work-dir", default="runs", help="where the runs' checkpoints and outputs go")
    args = parser.parse_args()

    work = Path(args.work_dir).resolve()
    rows = []
    for run in args.runs.split(","):
        config, steps = run.split(":")
        out = work / f"ae-{config}-{steps}"
        train_s = None
        if not out.is_dir():
            started = time.perf_counter()
            subprocess.run(
                ["diffarc", "train", "autoencoder", "--data", args.data, "--out", str(out), "--work-dir", str(work / f"ae-{config}-{steps}-work"),
                 "--config", config, "--steps", steps, "--batch-size", "6", "--crop", "96", "--lr", "1e-3",
                 "--lpips-weight", "0.1", "--lpips-weights", args.lpips_weights, "--checkpoint-minutes", "4",
                 "--report-seconds", "120"],
                check=True,
            )  # fmt: skip
            train_s = time.perf_counter() - started
        measured = subprocess.run(
            [sys.executable, str(HERE / "autoencoder_kodak.py"), "--model", str(out), "--kodak", args.kodak,
             "--lpips-weights", args.lpips_weights, "--json"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        kodak = json.loads(measured.stdout.strip().splitlines()[-1])
        row = {"config": config, "steps": int(steps), "parameters": parameter_count(out / "vae"), "train_s": train_s,
               "psnr": kodak["mean_psnr"], "lpips": kodak["mean_lpips"], "decode_s": kodak["mean_decode_s"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'config':<10} {'steps':>6} {'params':>8} {'train min':>9} {'Kodak PSNR':>10} {'LPIPS':>7} {'decode s':>8}")
    for r in rows:
        minutes = f"{r['train_s'] / 60:9.1f}" if r["train_s"] is not None else f"{'(earlier)':>9}"
        print(f"{r['config']:<10} {r['steps']:>6} {r['parameters'] / 1e6:7.2f}M {minutes} {r['psnr']:9.2f}  "
              f"{r['lpips']:7.4f} {r['decode_s']:8.2f}")


if __name__ == "__main__":
    main()
