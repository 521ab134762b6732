"""Shared fixtures: a real local Ray, a real S3-compatible server on 127.0.0.1, and test images."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# One torch thread in the test process: with Ray workers and other processes on few cores, torch's
# OpenMP threads spin against each other and small models run tens of times slower.
import torch  # noqa: E402

torch.set_num_threads(1)

# Training tasks cache frozen-encoder latents on disk; the tests' toy models keep theirs out of the user's cache,
# in a folder that goes with the test run (xdist's workers inherit the variable, so only the runner makes one).
if "DIFFARC_LATENT_CACHE" not in os.environ:
    os.environ["DIFFARC_LATENT_CACHE"] = tempfile.mkdtemp(prefix="diffarc-test-latents-")
    atexit.register(shutil.rmtree, os.environ["DIFFARC_LATENT_CACHE"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KODAK = SHARED / "data" / "kodak"
LPIPS_WEIGHTS = SHARED / "weights" / "lpips-squeeze" / "lpips_squeeze_v0.1.safetensors"


# The files that cost the most CPU time (benchmarks/suite_cpu.py: one process, Ray's workers counted),
# most first. The test runner (pytest-xdist, `--dist loadfile --no-loadscope-reorder`) gives each worker
# whole files, in this order, as it frees up: a module's Ray cluster and fixtures are set up once, and the
# long files start first, so the short ones fill the gaps at the end instead of a long one started last.
MOST_CPU_FIRST = (
    "pipeline/test_encode_decode.py", "pipeline/test_training_resume.py", "pipeline/test_ray_data.py",
    "jobs/test_kill_resume.py", "jobs/test_attacks.py", "pipeline/test_training.py", "pipeline/test_s3.py",
    "jobs/test_multinode.py", "jobs/test_concurrent_encode.py", "jobs/test_model_options.py",
    "jobs/test_storage_outage.py", "jobs/test_base_only.py", "jobs/test_cli.py", "pipeline/test_gpu_pinning.py",
    "jobs/test_encode.py", "pipeline/test_decode_params.py", "pipeline/test_hostile_archives.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.relative_to(Path(__file__).parent).as_posix()
        return MOST_CPU_FIRST.index(path) if path in MOST_CPU_FIRST else len(MOST_CPU_FIRST)

    items.sort(key=rank)  # stable: the other files, and each file's tests, keep their order


@pytest.fixture(scope="session")
def kodak() -> Path:
    if not KODAK.is_dir():
        pytest.skip(f"Kodak images not found at {KODAK} (../shared is absent)")
    return KODAK


@pytest.fixture(scope="module")
def ray_cluster():
    """One real local Ray cluster per test module, as design.md asks.

    A job on it starts one actor per CPU, two. Each actor is a process that imports torch and loads its
    model (about 4 CPU-s for a tiny ddcm or corrdiff model), and actor start-ups are most of what the suite
    costs: a test whose point is not how work is split passes actors=1 (`--actors 1`)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    gc.collect()  # see cluster.disconnect: handles caught in reference cycles are freed while Ray is up
    ray.shutdown()


def save_tiny_ldm(folder: Path, seed: int = 0, conditional: bool = False, dtype=torch.float32, flow: bool = False) -> Path:
    """A latent diffusion model folder of Stable Diffusion's classes at toy width, saved as a user's would be:
    AutoencoderKL (8× down, 4 latent channels), a UNet, DDIMScheduler with SD's betas. `conditional`
    gives SD 2.1's UNet class: UNet2DConditionModel with cross-attention to 1024-d context, linear projections.
    `flow`: a rectified-flow model instead (FlowMatchEulerDiscreteScheduler, as builtin:taef2's)."""
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel, UNet2DModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    if conditional:
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=1024, attention_head_dim=(2, 4), use_linear_projection=True,
        )  # fmt: skip
    else:
        unet = UNet2DModel(
            in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        )  # fmt: skip
    vae.to(dtype).save_pretrained(folder / "vae")
    unet.to(dtype).save_pretrained(folder / "unet")
    if flow:
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(folder / "scheduler")
    else:
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    return folder


def decode_in_new_process(stream: bytes, folder: Path, model: str | None = None, threads: int | None = None) -> np.ndarray:
    """Decode a stream in a fresh Python process that knows nothing but the stream (codec and params from
    its header) and, for weights other than the built-in default, the folder holding them; on `threads`
    torch threads if given (a decoder that is not thread-invariant is compared at one count)."""
    (folder / "stream.bin").write_bytes(stream)
    script = (
        (f"import torch\ntorch.set_num_threads({threads})\n" if threads else "")
        + "import numpy as np\n"
        "from diffarc.codecs.registry import codec_for_header, read_header\n"
        f"data = open({str(folder / 'stream.bin')!r}, 'rb').read()\n"
        f"codec = codec_for_header(read_header(data), model={model!r})\n"
        f"np.save({str(folder / 'decoded.npy')!r}, codec.decode([data])[0])\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    return np.load(folder / "decoded.npy")


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients plus a little texture: compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [128 + 100 * np.sin(x / (9 + seed) + c) * np.cos(y / (13 + seed) - c) for c in (0.0, 1.0, 2.0)], axis=2
    )
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Six small PNG/JPEG images, two of them in a sub-folder."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for index, (name, size) in enumerate(
        [("a.png", (48, 64)), ("b.jpg", (64, 40)), ("c.png", (33, 17)), ("d.png", (64, 64)),
         ("sub/e.jpg", (40, 72)), ("sub/f.png", (20, 30))]
    ):
        Image.fromarray(photo_like(*size, seed=index)).save(folder / name)
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1, for the whole test session."""
    executable = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(executable).exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield {
        "endpoint": endpoint,
        "env": {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        },
        "storage_options": {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint},
        },
    }
    process.terminate()
    process.wait(10)


@pytest.fixture
def lpips_weights() -> Path:
    if not LPIPS_WEIGHTS.is_file():
        pytest.skip(f"LPIPS weights not found at {LPIPS_WEIGHTS} (../shared is absent)")
    return LPIPS_WEIGHTS


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra)
    return env


RAY = str(Path(sys.executable).with_name("ray"))
# A cluster started by `ray start` asks joiners for a token unless told not to; these nodes are local.
RAY_NODE_ENV = cli_env(RAY_AUTH_MODE="disabled")


def session_processes(session: int, title: bytes = b"") -> set[int]:
    """The processes of one session whose command line starts with `title`. A job or `ray start` run as a
    session leader keeps its Ray processes in its session, which tells them from other jobs' on the machine
    (Ray titles an actor's process "ray::EncodeWorker…")."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(title):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[3]) == session:
                    pids.add(int(entry.name))
        except OSError:  # the process ended while being looked at
            continue
    return pids


def start_ray_node(*args: str) -> int:
    """`ray start ARGS` in a session of its own, on 127.0.0.1; returns the session, which holds the node's
    processes (stop_node)."""
    node = subprocess.Popen(
        [RAY, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
        env=RAY_NODE_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    if node.wait(timeout=180) != 0:
        stop_node(node.pid)
        raise RuntimeError(f"ray start {' '.join(args)} failed: {node.stdout.read()[-3000:]}")
    return node.pid


def stop_node(session: int) -> None:
    """SIGKILL every process of one node, as a lost machine would go: no goodbye to the cluster."""
    for pid in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def ray_head(cpus: int):
    """(address, session) of a head node started by `ray start --head`, stopped on leaving."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # a short path: Ray's socket paths must fit 107 bytes
    port = _free_port()
    session = start_ray_node("--head", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                             f"--temp-dir={temp}")  # fmt: skip
    try:
        yield f"127.0.0.1:{port}", session
    finally:
        stop_node(session)
        shutil.rmtree(temp, ignore_errors=True)


def write_bad_inputs(folder: Path) -> dict[str, tuple[int, int] | None]:
    """The awkward files real archives contain. Returns key → expected (height, width), or None where
    the item must land in the failure table."""
    import io
    import struct
    import zlib

    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, tuple[int, int] | None] = {}
    photo = Image.fromarray(photo_like(40, 60, seed=7))

    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    expected["truncated.jpg"] = None
    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = None
    (folder / "text.png").write_text("this is not an image\n")
    expected["text.png"] = None

    # A PNG whose header claims 100000×100000 pixels: refused before a single pixel is decoded.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    bomb += chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    (folder / "bomb.png").write_bytes(bomb)
    expected["bomb.png"] = None

    photo.convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    expected["cmyk.jpg"] = (40, 60)
    sixteen = (np.arange(30 * 50, dtype=np.uint16).reshape(30, 50) * 40).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    expected["sixteen.png"] = (30, 50)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    expected["palette.png"] = (40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    photo.save(folder / "rotated.jpg", "JPEG", exif=exif.tobytes())
    expected["rotated.jpg"] = (60, 40)
    frames = [Image.fromarray(photo_like(24, 32, seed=s)) for s in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected["animated.gif"] = (24, 32)
    Image.fromarray(photo_like(1, 1, seed=1)).save(folder / "one.png")
    expected["one.png"] = (1, 1)
    Image.fromarray(photo_like(1, 4000, seed=2)).save(folder / "strip.png")
    expected["strip.png"] = (1, 4000)
    Image.new("LA", (16, 12), (100, 0)).save(folder / "transparent.png")
    expected["transparent.png"] = (12, 16)
    return expected


@pytest.fixture
def bad_inputs(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "bad"
    return folder, write_bad_inputs(folder)
