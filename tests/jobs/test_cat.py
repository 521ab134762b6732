"""`diffarc cat`: one image out of an archive, under the same pixel and cost bounds as `decode`."""

import dataclasses
import subprocess
import sys

import pytest
from click.testing import CliRunner

from diffarc.codecs.container import pack, unpack
from diffarc.codecs.registry import create_codec
from diffarc.jobs.cli import main
from diffarc.pipeline.archive import ArchiveWriter, CodecSpec, EncodedItem, write_shard
from diffarc.pipeline.storage import Location

from ..conftest import photo_like

# `diffarc ARGS…` with the address space capped at what was in use after importing torch plus argv[1] MB.
CAPPED_CLI = """
import resource, sys
import torch
in_use = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (in_use + int(sys.argv[1]) * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
from diffarc.jobs.cli import main
main(sys.argv[2:], prog_name="diffarc")
"""


def archive_of(folder, codec, streams: dict[str, bytes]) -> str:
    """An archive holding these streams as they are (a hostile writer need not be diffarc's encoder); it
    records the largest size its rows claim as its pixel limit."""
    archive = Location(str(folder))
    spec = CodecSpec(codec.name, codec.stream_params, codec.fingerprint.hex())
    writer = ArchiveWriter(archive, spec, source="hostile")
    items = []
    for key, stream in streams.items():
        header = unpack(stream)[0]
        items.append(EncodedItem(key, stream, header.width, header.height, 1, "0" * 64))
    writer.commit(write_shard(archive, items, spec), list(streams), [])
    writer.finish()
    return str(folder)


def test_cat_takes_max_pixels_over_the_archives_own_limit(tmp_path):
    codec = create_codec("jpeg")
    archive = archive_of(tmp_path / "arc", codec, {"a.jpg": codec.encode([photo_like(24, 32, seed=1)])[0]})
    strict = CliRunner().invoke(main, ["cat", archive, "a.jpg", "-o", str(tmp_path / "a.png"), "--max-pixels", "500"])
    assert strict.exit_code == 1
    assert "stream declares 32×24 = 768 pixels, over the limit of 500" in strict.output
    assert not (tmp_path / "a.png").exists()
    assert CliRunner().invoke(main, ["cat", archive, "a.jpg", "-o", str(tmp_path / "a.png")]).exit_code == 0
    assert (tmp_path / "a.png").stat().st_size > 0


@pytest.mark.slow
def test_cat_refuses_a_small_stream_claiming_a_large_image_in_one_sentence_and_bounded_memory(tmp_path):
    # 12 megapixels is the archive's own limit, but the stream's few range-coded words
    # cannot hold the hyper-latent's 376 000 symbols (32 × 125 × 94): refused before they are decoded.
    # t = 0, one pass: with the default's 8 UNet calls the decode-work bound would refuse it first.
    codec = create_codec("latent-denoise", {"timestep": "off"})
    stream = codec.encode([photo_like(16, 16, seed=1)])[0]
    header, payload = unpack(stream)
    hostile = pack(dataclasses.replace(header, width=4000, height=3000), payload)
    archive = archive_of(tmp_path / "arc", codec, {"big.png": hostile})
    run = subprocess.run(
        # 2500 MB of address space over torch: the CLI's imports and builtin:taef2's model reserve ~1.6 GB
        # of it before any stream is read (virtual, mostly not resident).
        [sys.executable, "-c", CAPPED_CLI, "2500", "cat", archive, "big.png", "-o", str(tmp_path / "big.png")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert "words cannot hold 32×11750 symbols" in run.stderr
    assert not (tmp_path / "big.png").exists()
