"""A short run of benchmarks/fuzz_streams.py: mutated streams of every registered codec, each decoded in a
capped worker process, must all decode or be refused with a BitstreamError (no other exception, no hang,
no abort, nothing over the memory cap). The benchmark's own run is ≥ 100 000 cases; this one is a few hundred."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffarc.codecs.registry import codec_names

FUZZER = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_streams.py"

pytestmark = pytest.mark.slow


def test_a_few_hundred_mutated_streams_of_every_codec_decode_or_are_refused(tmp_path):
    report = tmp_path / "fuzz.json"
    run = subprocess.run(
        [sys.executable, str(FUZZER), "--cases", "300", "--seed", "11", "--workers", "2", "--json", str(report)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert report.exists(), run.stderr[-3000:]
    found = json.loads(report.read_text())
    # Every registered codec is fuzzed, or skipped with the reason it could make no seed stream.
    assert set(found["outcomes"]) | set(found["skipped"]) == set(codec_names())
    assert all(found["skipped"].values())
    bad = [f"{e['codec']} {e['outcome']} (replay: --seed 11 --replay {e['case']}): {e['detail']}" for e in found["examples"]]
    assert found["bad"] == 0 and run.returncode == 0, "\n".join(bad) or run.stdout
    assert sum(sum(o.values()) for o in found["outcomes"].values()) == 300
