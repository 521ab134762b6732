"""How long `diffarc encode` takes to say that its source does not exist: with the default codec and with
--codec jpeg (issue 27's target: under 1 s each).

    nice python benchmarks/preflight_time.py [--runs 5]

Each command runs --runs times as a user runs it (the `diffarc` script beside this Python). Printed for
each: the median wall seconds and the median CPU seconds (user + system) of the process, and the
heavy modules it imported (torch, ray, diffusers, pyarrow: none is needed to find a source missing). On a
shared machine the wall time includes waiting for a core; the CPU time does not.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "ray", "diffusers", "pyarrow")


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stderr) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, run.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    script = str(Path(sys.executable).with_name("diffarc"))
    with tempfile.TemporaryDirectory(prefix="diffarc-preflight-") as scratch:
        missing, archive = f"{scratch}/no-such-folder", f"{scratch}/out.diffarc"
        for label, extra in (("default codec", []), ("--codec jpeg", ["--codec", "jpeg"])):
            command = [script, "encode", missing, archive, *extra]
            runs = [timed(command) for _ in range(args.runs)]
            said = runs[0][2].strip().splitlines()[-1]
            # Which heavy modules the same command imports (a separate run, with -X importtime).
            traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffarc.jobs.cli", "encode", missing,
                                     archive, *extra], capture_output=True, text=True).stderr  # fmt: skip
            imported = sorted({m for m in HEAVY for line in traced.splitlines()
                               if line.startswith("import time:") and line.split("|")[-1].strip() == m})  # fmt: skip
            print(f"{label}: wall {statistics.median(r[0] for r in runs):.2f} s, CPU "
                  f"{statistics.median(r[1] for r in runs):.2f} s (median of {args.runs}); heavy imports: "
                  f"{', '.join(imported) or 'none'}; says {said!r}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("DIFFARC_LOG_LEVEL", "warning")
    sys.exit(main())
