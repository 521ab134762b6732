import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffarc.codecs.parts.metrics import LPIPS, LPIPS_WEIGHTS_ENV, find_lpips_weights, ms_ssim, psnr

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LPIPS_FILE = SHARED / "weights" / "lpips-squeeze" / "lpips_squeeze_v0.1.safetensors"
KODIM01 = SHARED / "data" / "kodak" / "kodim01.png"

needs_lpips = pytest.mark.skipif(not LPIPS_FILE.is_file(), reason=f"LPIPS weights absent: {LPIPS_FILE}")


def photo_like(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth gradients, edges and some texture: enough structure for the metrics to react to."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([xx / w * 200, yy / h * 180, (xx + yy) / (h + w) * 150], axis=-1) + 30
    img[h // 4 : h // 2, w // 4 : w // 2] += 60
    img += 15 * np.sin(xx / 3)[..., None] * np.cos(yy / 5)[..., None]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def add_noise(img: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


# --- PSNR -------------------------------------------------------------------------------------------


def test_psnr_identical_is_inf():
    img = photo_like()
    assert psnr(img, img.copy()) == math.inf


def test_psnr_matches_formula_for_known_mse():
    grey = np.full((32, 48, 3), 128, np.uint8)
    assert psnr(grey, grey + 5) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-6)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        ms_ssim(np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8))


# --- MS-SSIM ----------------------------------------------------------------------------------------


def test_ms_ssim_identical_is_one():
    img = photo_like(200, 240)
    assert ms_ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_decreases_with_noise():
    img = photo_like(192, 192)
    scores = [ms_ssim(img, add_noise(img, sigma)) for sigma in (2, 5, 10, 20, 40)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] < 1.0


@pytest.mark.parametrize("shape", [(40, 30, 3), (30, 40, 3), (1, 4000, 3), (4000, 1, 3), (11, 11, 3)])
def test_ms_ssim_small_images(shape):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = add_noise(a, 20)
    value = ms_ssim(a, b)
    assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert ms_ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-6)


def naive_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook single-scale SSIM, 11x11 Gaussian (sigma 1.5), valid positions, channel mean."""
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(k, k) / np.outer(k, k).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(3):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
                mx, my = (window * px).sum(), (window * py).sum()
                vx, vy = (window * (px - mx) ** 2).sum(), (window * (py - my) ** 2).sum()
                cov = (window * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ms_ssim_on_one_scale_image_is_plain_ssim():
    # 21 px fits the window once but not at half size: one scale, its weight renormalised to 1.
    img = photo_like(21, 30)
    noisy = add_noise(img, 12)
    assert ms_ssim(img, noisy) == pytest.approx(naive_ssim(img, noisy), abs=1e-5)  # float32 vs float64


# --- LPIPS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips():
    if not LPIPS_FILE.is_file():
        pytest.skip(f"LPIPS weights absent: {LPIPS_FILE}")
    return LPIPS(LPIPS_FILE)


def test_lpips_identical_is_zero(lpips):
    img = photo_like()
    assert abs(lpips(img, img.copy())) < 1e-6


def test_lpips_grows_with_noise_and_is_symmetric(lpips):
    img = photo_like()
    weak, strong = add_noise(img, 5), add_noise(img, 40)
    d_weak, d_strong = lpips(img, weak), lpips(img, strong)
    assert d_strong > d_weak > 0
    assert lpips(strong, img) == pytest.approx(d_strong, abs=1e-5)


def test_lpips_batch_matches_single_calls(lpips):
    img = photo_like()
    pairs = [(img, add_noise(img, 5)), (img, add_noise(img, 40)), (img[:64], add_noise(img[:64], 10))]
    assert lpips.batch(pairs) == pytest.approx([lpips(a, b) for a, b in pairs], abs=1e-5)


def test_lpips_rejects_too_small_images(lpips):
    tiny = np.zeros((8, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="at least"):
        lpips(tiny, tiny)


@pytest.mark.skipif(not KODIM01.is_file(), reason=f"Kodak image absent: {KODIM01}")
def test_lpips_ranks_jpeg_qualities_on_kodak(lpips):
    original = np.asarray(Image.open(KODIM01).convert("RGB"))
    q10, q90 = jpeg(original, 10), jpeg(original, 90)
    d10, d90 = lpips(original, q10), lpips(original, q90)
    print(f"kodim01 LPIPS-squeeze: q10 {d10:.4f}, q90 {d90:.4f}")
    assert d10 > d90 > 0
    # Published LPIPS-squeeze magnitudes; far outside means a wrong tap, scaling or normalisation.
    assert 0.15 < d10 < 0.5 and 0.002 < d90 < 0.06


@needs_lpips
def test_lpips_file_missing_a_head_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(LPIPS_FILE))
    del state["lin3.model.1.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight"):
        LPIPS(broken)


# --- find_lpips_weights -----------------------------------------------------------------------------


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "w" / "lpips.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"not read by the finder")
    return path


def test_find_explicit_file(weights_file, monkeypatch):
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    assert find_lpips_weights(str(weights_file)) == weights_file


def test_find_folder_with_one_file(weights_file, monkeypatch):
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    assert find_lpips_weights(weights_file.parent) == weights_file


def test_find_folder_with_two_files_is_ambiguous(weights_file):
    (weights_file.parent / "other.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="exactly one"):
        find_lpips_weights(weights_file.parent)


def test_find_env_var(weights_file, monkeypatch):
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(weights_file.parent))
    assert find_lpips_weights() == weights_file


def test_explicit_path_wins_over_env_var(weights_file, tmp_path, monkeypatch):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"")
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(weights_file))
    assert find_lpips_weights(other) == other


def test_find_missing_path_raises(tmp_path, monkeypatch):
    missing = tmp_path / "typo.safetensors"
    with pytest.raises(FileNotFoundError, match="typo"):
        find_lpips_weights(missing)
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=LPIPS_WEIGHTS_ENV):
        find_lpips_weights()


def test_find_nothing_set_is_none(monkeypatch):
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    assert find_lpips_weights() is None
