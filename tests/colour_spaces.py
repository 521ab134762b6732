"""Colour spaces for the colour-management tests and benchmarks/colour_profiles.py, built from their
definitions: ICC profiles written from primaries, white point and tone curve, the same conversions in
float arithmetic (an independent check of what littleCMS does), CIELAB and the CIEDE2000 difference.

Definitions used: Display P3 (DCI-P3 primaries, D65, the sRGB curve), Adobe RGB (1998) (its primaries,
D65, gamma 563/256), ProPhoto RGB (ROMM primaries, D50, gamma 1.8), sRGB (IEC 61966-2-1). Profiles are
ICC v4 matrix/TRC display profiles, colorants Bradford-adapted to the D50 connection space. CIEDE2000
follows Sharma, Wu and Dalal, "The CIEDE2000 color-difference formula: implementation notes,
supplementary test data, and mathematical observations" (2005).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

D50 = np.array([0.9642, 1.0, 0.8249])  # the ICC connection space's white
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def _xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _adaptation(white: np.ndarray) -> np.ndarray:
    """Bradford chromatic adaptation from `white` to D50."""
    gain = (_BRADFORD @ D50) / (_BRADFORD @ white)
    return np.linalg.inv(_BRADFORD) @ np.diag(gain) @ _BRADFORD


@dataclass(frozen=True)
class RgbSpace:
    name: str
    primaries: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]  # xy of R, G, B
    white: tuple[float, float]  # xy
    gamma: float | None  # a pure power curve; None: the sRGB curve

    @property
    def to_d50(self) -> np.ndarray:
        """Linear RGB → XYZ, adapted to D50 (the profile's colorants are its columns)."""
        columns = np.stack([_xyz(*p) for p in self.primaries], axis=1)
        white = _xyz(*self.white)
        return _adaptation(white) @ columns @ np.diag(np.linalg.solve(columns, white))

    def linear(self, rgb8: np.ndarray) -> np.ndarray:
        v = np.asarray(rgb8, dtype=np.float64) / 255
        if self.gamma is not None:
            return v**self.gamma
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)

    def encode(self, linear: np.ndarray) -> np.ndarray:
        """Linear values (clipped to [0, 1]) → 8-bit code values, unrounded."""
        v = np.clip(linear, 0, 1)
        if self.gamma is not None:
            return 255 * v ** (1 / self.gamma)
        return 255 * np.where(v <= 0.0031308, 12.92 * v, 1.055 * v ** (1 / 2.4) - 0.055)

    def xyz_d50(self, rgb8: np.ndarray) -> np.ndarray:
        return self.linear(rgb8) @ self.to_d50.T

    def from_xyz_d50(self, xyz: np.ndarray) -> np.ndarray:
        """XYZ (D50) → 8-bit code values in this space, unrounded, out-of-gamut colours clipped."""
        return self.encode(xyz @ np.linalg.inv(self.to_d50).T)

    def icc(self) -> bytes:
        """An ICC v4 matrix/TRC display profile of this space."""
        if self.gamma is not None:
            curve = _tag(b"para", struct.pack(">HH", 0, 0) + _s15(self.gamma))
        else:
            curve = _tag(b"para", struct.pack(">HH", 3, 0) + _s15(2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
        colorants = self.to_d50
        tags = {
            b"desc": _mluc(self.name),
            b"cprt": _mluc("No copyright: made by diffarc's tests"),
            b"wtpt": _tag(b"XYZ ", _s15(*D50)),
            b"chad": _tag(b"sf32", _s15(*_adaptation(_xyz(*self.white)).ravel())),
            b"rXYZ": _tag(b"XYZ ", _s15(*colorants[:, 0])),
            b"gXYZ": _tag(b"XYZ ", _s15(*colorants[:, 1])),
            b"bXYZ": _tag(b"XYZ ", _s15(*colorants[:, 2])),
            b"rTRC": curve,
            b"gTRC": curve,
            b"bTRC": curve,
        }
        return _profile(b"mntr", b"RGB ", b"XYZ ", tags)


SRGB = RgbSpace("sRGB", ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)), (0.3127, 0.3290), None)
DISPLAY_P3 = RgbSpace("Display P3", ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)), (0.3127, 0.3290), None)
ADOBE_RGB = RgbSpace("Adobe RGB (1998)", ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06)), (0.3127, 0.3290), 563 / 256)
PROPHOTO_RGB = RgbSpace(
    "ProPhoto RGB", ((0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001)), (0.3457, 0.3585), 1.8
)


def cmyk_icc(name: str, cmyk_to_srgb) -> bytes:
    """An ICC v4 CMYK output profile whose A2B0 table (5 points per ink) maps ink amounts in [0, 1]
    (an N×4 array) to the colours `cmyk_to_srgb` gives as 8-bit sRGB (N×3), through CIELAB."""
    grid = np.linspace(0, 1, 5)
    inks = np.stack(np.meshgrid(grid, grid, grid, grid, indexing="ij"), axis=-1).reshape(-1, 4)  # C slowest
    lab = xyz_to_lab(SRGB.xyz_d50(cmyk_to_srgb(inks)))
    # lut16's CIELAB: L 0..100 → 0..0xFF00, a and b −128..128 → 0..0x10000 (0 at 0x8000).
    encoded = np.rint(np.stack([lab[:, 0] * 0xFF00 / 100, (lab[:, 1] + 128) * 256, (lab[:, 2] + 128) * 256], -1))
    identity = np.array([0, 0xFFFF])
    lut = (
        struct.pack(">BBBB", 4, 3, len(grid), 0)
        + _s15(1, 0, 0, 0, 1, 0, 0, 0, 1)
        + struct.pack(">HH", 2, 2)
        + np.tile(identity, 4).astype(">u2").tobytes()
        + encoded.clip(0, 0xFFFF).astype(">u2").tobytes()
        + np.tile(identity, 3).astype(">u2").tobytes()
    )
    tags = {b"desc": _mluc(name), b"cprt": _mluc("No copyright: made by diffarc's tests"),
            b"wtpt": _tag(b"XYZ ", _s15(*D50)), b"A2B0": _tag(b"mft2", lut)}  # fmt: skip
    return _profile(b"prtr", b"CMYK", b"Lab ", tags)


def xyz_to_lab(xyz: np.ndarray) -> np.ndarray:
    """CIELAB of XYZ values relative to D50 (the ICC connection space's white)."""
    t = np.asarray(xyz) / D50
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e_2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of two arrays of CIELAB values (…×3), with kL = kC = kH = 1."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, dtype=np.float64), -1, 0)
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    chroma_zero = c1p * c2p == 0
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(chroma_zero, 0, dh)
    dL, dC = L2 - L1, c2p - c1p
    dH = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)
    L_mean, cp_mean = (L1 + L2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(
        chroma_zero, h_sum,
        np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)),
    )  # fmt: skip
    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))  # fmt: skip
    s_l = 1 + 0.015 * (L_mean - 50) ** 2 / np.sqrt(20 + (L_mean - 50) ** 2)
    s_c = 1 + 0.045 * cp_mean
    s_h = 1 + 0.015 * cp_mean * t
    rotation = -2 * np.sqrt(cp_mean**7 / (cp_mean**7 + 25.0**7)) * np.sin(np.radians(60 * np.exp(-(((h_mean - 275) / 25) ** 2))))
    return np.sqrt((dL / s_l) ** 2 + (dC / s_c) ** 2 + (dH / s_h) ** 2 + rotation * (dC / s_c) * (dH / s_h))


def _s15(*values: float) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _tag(kind: bytes, body: bytes) -> bytes:
    return kind + b"\0\0\0\0" + body


def _mluc(text: str) -> bytes:
    encoded = text.encode("utf-16-be")
    return _tag(b"mluc", struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(encoded), 28) + encoded)


def _profile(device_class: bytes, space: bytes, connection: bytes, tags: dict[bytes, bytes]) -> bytes:
    table_size = 4 + 12 * len(tags)
    offset, entries, data = 128 + table_size, [], b""
    for signature, body in tags.items():
        body += b"\0" * (-len(body) % 4)
        entries.append(struct.pack(">4sII", signature, offset + len(data), len(body)))
        data += body
    size = 128 + table_size + len(data)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"\0\0\0\0", 0x04300000, device_class, space, connection)
        + struct.pack(">6H", 2026, 12, 6, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + _s15(*D50)
        + b"\0" * 48  # creator, profile ID, reserved
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(entries) + data
