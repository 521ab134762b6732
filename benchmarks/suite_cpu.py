"""Where the test suite's CPU time goes: a pytest plugin that charges each test the whole machine's busy CPU
seconds while it ran (its fixtures' set-up and tear-down included), and prints the costliest files and tests.

    PYTHONPATH=benchmarks python -m pytest -q -p no:xdist -p suite_cpu [tests …]

Run it on one process (-p no:xdist) on an otherwise idle machine: the machine's counters cannot tell two
tests apart. The whole machine's, from /proc/stat with nice time, because most of a job's work runs in
Ray's workers (at nice 15) and subprocesses, which the test process's own counters never see. The
parallel suite's time on 2 cores is about the total here over 2 plus what running four at once adds;
tests/conftest.py's MOST_CPU_FIRST comes from these figures.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

COSTS: list[tuple[float, float, str]] = []  # (CPU seconds, wall seconds, test id)


def machine_cpu_seconds() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
    return (user + nice + system + irq + softirq) / 100  # USER_HZ


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, began = machine_cpu_seconds(), time.perf_counter()
    yield
    COSTS.append((machine_cpu_seconds() - cpu, time.perf_counter() - began, item.nodeid))


def pytest_terminal_summary(terminalreporter) -> None:
    by_file: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for cpu, wall, nodeid in COSTS:
        totals = by_file[nodeid.split("::", 1)[0]]
        totals[0] += cpu
        totals[1] += wall
        totals[2] += 1
    write = terminalreporter.write_line
    write(f"machine CPU {sum(c for c, _, _ in COSTS):.0f} s over {sum(w for _, w, _ in COSTS):.0f} s of tests")
    write("costliest files: CPU s, wall s, tests")
    for path, (cpu, wall, count) in sorted(by_file.items(), key=lambda kv: -kv[1][0])[:20]:
        write(f"  {cpu:6.0f} {wall:6.0f} {count:4d}  {path}")
    write("costliest tests: CPU s, wall s")
    for cpu, wall, nodeid in sorted(COSTS, reverse=True)[:20]:
        write(f"  {cpu:6.1f} {wall:6.1f}  {nodeid}")
