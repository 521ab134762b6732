"""Weights by fingerprint from the command line: `encode --embed-model`, `--model`, `cat --stream`, and
verify's check of embedded weights, with a tiny model saved by the test and a real local Ray."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffarc.codecs import container
from diffarc.codecs.errors import ModelError
from diffarc.codecs.registry import codec_for_header
from diffarc.jobs.cli import main
from diffarc.jobs.options import EXIT_ITEMS_FAILED
from diffarc.pipeline.archive import require_manifest
from diffarc.pipeline.archive import ArchiveReader
from diffarc.pipeline.storage import Location

from ..conftest import photo_like, save_tiny_ldm

pytestmark = pytest.mark.slow

DDCM = ["--codec", "ddcm", "--param", "steps=3", "--param", "codebook=4", "--param", "tile=2"]


def run(*args):
    # One actor per job: each loads the model, and these jobs are a handful of tiny images.
    actors = ["--actors", "1"] if args[0] in ("encode", "decode", "verify") else []
    return CliRunner().invoke(main, [str(a) for a in (*args, *actors)])


def pngs(folder) -> dict[str, np.ndarray]:
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.fixture
def weights(tmp_path):
    return save_tiny_ldm(tmp_path / "weights" / "model")


def test_an_archive_with_embedded_weights_decodes_after_they_are_gone(ray_cluster, image_folder, weights, tmp_path):
    arc = tmp_path / "arc"
    encoded = run("encode", image_folder, arc, *DDCM, "--param", f"model={weights}", "--embed-model")
    assert encoded.exit_code == 0, encoded.output
    manifest = require_manifest(Location(str(arc)))
    fingerprint = manifest.codec.fingerprint
    assert manifest.codec.hint == {"model": str(weights), "unet": ""} and "model" not in manifest.codec.params
    assert [m.fingerprint for m in manifest.models] == [fingerprint]
    assert (arc / "models" / fingerprint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert run("cat", arc, "sub/e.jpg", "--stream", "-o", tmp_path / "e.dfar").exit_code == 0
    stream = (tmp_path / "e.dfar").read_bytes()
    expected = codec_for_header(container.unpack(stream)[0], model=str(weights)).decode([stream])[0]

    shutil.rmtree(weights)
    decoded = run("decode", arc, tmp_path / "out")
    assert decoded.exit_code == 0, decoded.output
    after = pngs(tmp_path / "out")
    assert len(after) == 6 and np.array_equal(after["sub/e.png"], expected)
    assert run("cat", arc, "sub/e.jpg", "-o", tmp_path / "e.png").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "e.png")), expected)
    assert run("verify", arc).exit_code == 0
    facts = json.loads(run("info", arc, "--json").stdout)
    assert facts["model_embedded"] and facts["archive_bytes"] > manifest.totals["archive_bytes"] + manifest.models[0].bytes - 1


def test_verify_reports_a_tampered_embedded_weight_file(ray_cluster, image_folder, weights, tmp_path):
    arc = tmp_path / "arc"
    assert run("encode", image_folder, arc, *DDCM, "--param", f"model={weights}", "--embed-model").exit_code == 0
    shutil.rmtree(weights)  # the archive's copy is the only one
    fingerprint = require_manifest(Location(str(arc))).codec.fingerprint
    tampered = arc / "models" / fingerprint / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0x01  # the last byte of a weight
    tampered.write_bytes(bytes(data))

    verified = run("verify", arc)
    assert verified.exit_code == EXIT_ITEMS_FAILED, verified.output
    lines = verified.stdout.splitlines()
    assert lines[:2] == [  # the streams themselves parse; with no weights of their fingerprint none decodes
        "NOT INTACT: 6 items in 1 shards (0 decoded), 2 archive problems, 0 items that do not parse or decode",
        f"  problem: models/{fingerprint}/unet/diffusion_pytorch_model.safetensors: size or SHA-256 differs from "
        "the manifest (damaged or replaced)",
    ]
    assert lines[2].startswith(f"  problem: streams not decoded: no model weights with fingerprint {fingerprint}")
    assert len(lines) == 3
    # Decoding accepts no weights but the archive's fingerprint: the tampered copy is refused, by name.
    archive = Location(str(arc))
    with pytest.raises(ModelError, match=f"tried the archive's {arc}/models/{fingerprint} \\(weights "):
        ArchiveReader(archive, require_manifest(archive)).codec()


def test_the_model_option_finds_weights_that_moved(ray_cluster, image_folder, weights, tmp_path):
    arc = tmp_path / "arc"
    assert run("encode", image_folder, arc, *DDCM, "--param", f"model={weights}").exit_code == 0
    moved = tmp_path / "moved"
    shutil.move(weights, moved)
    archive = Location(str(arc))
    manifest = require_manifest(archive)
    with pytest.raises(ModelError) as missing:
        ArchiveReader(archive, manifest).codec()
    assert f"no model weights with fingerprint {manifest.codec.fingerprint} found for ddcm" in str(missing.value)
    assert f"The location recorded when encoding, model={weights}, was not looked at" in str(missing.value)
    with pytest.raises(ModelError, match=f"the recorded location model={weights} \\(ModelError: "):
        ArchiveReader(archive, manifest).codec(trust_hint=True)
    other = save_tiny_ldm(tmp_path / "other", seed=1)
    with pytest.raises(ModelError, match=f"--model {other} \\(weights "):
        ArchiveReader(archive, manifest).codec(model=str(other))

    decoded = run("decode", arc, tmp_path / "out", "--model", moved)
    assert decoded.exit_code == 0, decoded.output
    assert run("cat", arc, "a.png", "--model", moved, "-o", tmp_path / "a.png").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), pngs(tmp_path / "out")["a.png"])
    assert run("verify", arc, "--against", image_folder, "--model", moved).exit_code == 0

    # `cat --stream`: the standalone stream, which decodes to the same image with the weights found anywhere.
    assert run("cat", arc, "a.png", "--stream", "-o", tmp_path / "a.dfar").exit_code == 0
    stream = (tmp_path / "a.dfar").read_bytes()
    header = container.unpack(stream)[0]
    decoded = codec_for_header(header, model=str(moved)).decode([stream])[0]
    assert np.array_equal(decoded, pngs(tmp_path / "out")["a.png"])


def test_resuming_accepts_the_same_weights_elsewhere_and_refuses_other_weights(ray_cluster, image_folder, weights, tmp_path):
    arc = tmp_path / "arc"
    assert run("encode", image_folder, arc, *DDCM, "--param", f"model={weights}").exit_code == 0
    Image.fromarray(photo_like(24, 40, seed=5)).save(image_folder / "new.png")
    copy = shutil.copytree(weights, tmp_path / "copy")
    resumed = run("encode", image_folder, arc, *DDCM, "--param", f"model={copy}", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert (json.loads(resumed.stdout)["already_done"], json.loads(resumed.stdout)["encoded"]) == (6, 1)
    assert require_manifest(Location(str(arc))).codec.hint == {"model": str(copy), "unet": ""}

    other = save_tiny_ldm(tmp_path / "other", seed=1)
    (image_folder / "newer.png").write_bytes((image_folder / "new.png").read_bytes())
    refused = run("encode", image_folder, arc, *DDCM, "--param", f"model={other}")
    assert refused.exit_code == 1 and "resume with the same codec, parameters and weights" in refused.output
