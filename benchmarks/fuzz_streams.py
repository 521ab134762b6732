"""Fuzz every registered codec's decoder with mutated streams: does each bad stream raise BitstreamError,
quickly and in bounded memory?

    seed streams: every codec in the registry, a few cheap settings, images of 16×16, 64×48 and 1×23
        │  case id + --seed ──► its own random generator: the same case on every run (replayable)
        ▼
    mutate: bit flips, inserted/deleted bytes, truncations (CRC stale or recomputed), width/height and
            length fields, hostile params JSON (not an object, nested, 1e999, NaN, wrong types, other
            valid settings such as another precision), payload edits with the framing and CRC made
            consistent, payloads forged to the length a codec's rate formula asks for, spliced streams;
            15 % of cases go through the archive's compact framing
        ▼
    worker process (forked from this one, codecs already loaded; address space capped with RLIMIT_AS):
            codec.decode([stream], max_pixels=--max-pixels), timed
        ▼
    outcome: decoded · refused (a BitstreamError) — the two good ones — or
             error:TYPE (any other exception), over-memory (an allocation refused under the cap),
             hang (over --timeout seconds of CPU, or 30 times that on the clock: the worker is
             stopped), abort (the worker died)

Every case decodes with the codec object that wrote its seed, which takes its parameters from the stream's
header, as an archive's decoder does. `--max-pixels` plays the archive's recorded limit (the default,
128×128, is what an archive of such small images would be decoded under): the decoder's time and memory
are bounded by that limit, so the timeout and the memory cap test that bound. Time is CPU time (each
worker runs torch on one thread): on a machine shared with other work, the clock would count their time
too. Codecs whose seed streams cannot be made (weights missing) are skipped and the reason printed.

    python benchmarks/fuzz_streams.py --cases 100000            # the full run; prints counts per outcome and codec
    python benchmarks/fuzz_streams.py --replay 4711             # one case in this process: what it is, its traceback
    python benchmarks/fuzz_streams.py --replay 4711 --save x.bin  # and its stream (compact ones as expanded)

ddcm and latent-denoise use the built-in model `builtin:ldm-small`: a case that gets past their checks
costs a real decode (tens of milliseconds at these sizes), so they are seeded with few steps.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing
import os
import random
import resource
import signal
import struct
import sys
import time
import traceback
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait

import numpy as np

# Before torch is imported: one thread per worker, and no thread pool a fork could inherit half-locked.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from diffarc.codecs import container  # noqa: E402
from diffarc.codecs.errors import BitstreamError  # noqa: E402
from diffarc.codecs.registry import codec_class, codec_names, create_codec  # noqa: E402

torch.set_num_threads(1)

GOOD = ("decoded", "refused")
SEED_SIZES = ((16, 16), (48, 64), (1, 23))  # (height, width)
# Settings a decode of which costs tens of milliseconds; a codec not named here is seeded with its
# defaults and its presets.
CHEAP_SETTINGS = {
    "ddcm": [
        {"steps": 4},
        {"steps": 4, "tile": 0, "codebook": 16},
        {"steps": 3, "selection": "mp", "atoms": 3},
        {"steps": 3, "selection": "turbo", "atoms": 2, "codebook": 64},
        {"steps": 3, "precision": "bf16"},
    ],
    "latent-denoise": [{"steps": 2}, {"timestep": "off", "step": 0.5}, {"steps": 2, "precision": "bf16"}],
}
INTERESTING_SIDES = (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 31, 32, 33, 48, 63, 64, 65, 127, 128, 129, 255, 256,
                     1000, 4096, 13000, 65535, 65536, 1 << 24, 2**31 - 1, 2**32 - 1)  # fmt: skip
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
HOSTILE_VALUES = ("1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1e-999", "123456789012345678901234567890",
                  "-1", "0", "1.5", "true", "false", "null", '""', '"x"', "[]", "{}", "[1]", '{"a":1}',
                  '"fp16"', '"bf16"', '"fp32"', "65536", "4294967296")  # fmt: skip
COMPACT_SHARE = 0.15
PR_SET_PDEATHSIG = 1  # prctl option (Linux): the signal a process gets when its parent dies


# ---------------------------------------------------------------------------------------------- seeds


@dataclass
class Seed:
    codec: str
    label: str  # the settings, for people
    stream: bytes
    decoder: object  # the codec that wrote it: decodes every case made from it


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients with a little noise: small streams that still exercise every symbol path."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / 7 + c) * np.cos(y / 11 - c) for c in (0.0, 1.0, 2.0)], axis=2)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def make_seeds(names: list[str]) -> tuple[list[Seed], dict[str, str]]:
    """Seed streams of every codec that can make them; the others, with the reason they were skipped."""
    images = [photo(h, w, i) for i, (h, w) in enumerate(SEED_SIZES)]
    seeds, skipped = [], {}
    for name in names:
        cls = codec_class(name)
        settings = CHEAP_SETTINGS.get(name) or [{}] + [dict(p) for p in cls.presets.values()]
        reasons = []
        for params in settings:
            label = ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"
            try:
                codec = create_codec(name, params)
                streams = codec.encode(images)
            except Exception as exc:  # weights missing, a setting this machine cannot run: say so, go on
                reasons.append(f"{label}: {type(exc).__name__}: {exc}")
                continue
            seeds += [Seed(name, f"{label} {h}×{w}", s, codec) for s, (h, w) in zip(streams, SEED_SIZES)]
        if not any(s.codec == name for s in seeds):
            skipped[name] = "; ".join(reasons)
    return seeds, skipped


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Fields:
    """A full stream's fields, each free to be anything (the container's packer refuses what is fuzzed here)."""

    version: int
    codec: bytes
    params: bytes
    fingerprint: bytes
    width: int
    height: int
    payload: bytes
    length: int | None = None  # the payload length field; None: the payload's true length

    @classmethod
    def parse(cls, stream: bytes) -> Fields:
        header, payload = container.unpack(stream)
        return cls(container.FORMAT_VERSION, header.codec.encode(), container.canonical_json(header.params),
                   header.fingerprint, header.width, header.height, payload)  # fmt: skip

    def body(self) -> bytes:
        length = len(self.payload) if self.length is None else self.length
        return b"".join([
            container.MAGIC, bytes([self.version & 0xFF, len(self.codec) & 0xFF]), self.codec,
            struct.pack(">H", len(self.params) & 0xFFFF), self.params, bytes([len(self.fingerprint) & 0xFF]),
            self.fingerprint, struct.pack(">III", *(v & 0xFFFFFFFF for v in (self.width, self.height, length))),
            self.payload,
        ])  # fmt: skip

    def stream(self) -> bytes:
        body = self.body()
        return body + struct.pack(">I", zlib.crc32(body))


@dataclass
class Case:
    """One mutated stream, and how it is decoded: as it is (full framing) or expanded with `spec` (compact)."""

    case_id: int
    seed: Seed
    fields: Fields
    compact: bool = False
    spec_id: int = 0
    spec: container.Spec | None = None
    raw: bytes | None = None  # set once a mutation worked on the bytes rather than the fields
    steps: list[str] = field(default_factory=list)

    def data(self) -> bytes:
        if self.raw is not None:
            return self.raw
        if not self.compact:
            return self.fields.stream()
        f = self.fields
        framing = container.COMPACT_FRAMING.pack(container.MAGIC, container.COMPACT | (f.version & 0x7F), self.spec_id,
                                                 f.width & 0xFFFFFFFF, f.height & 0xFFFFFFFF)  # fmt: skip
        return framing + f.payload + self.compact_crc(f.width, f.height, f.payload)

    def compact_crc(self, width: int, height: int, payload: bytes) -> bytes:
        """The CRC a compact stream carries: of the full stream it expands to with the spec table."""
        try:
            body = container._full_body(self.spec, width & 0xFFFFFFFF, height & 0xFFFFFFFF, payload)
        except Exception:  # a spec the packer refuses: any CRC will do, expanding fails first
            return b"\0\0\0\0"
        return struct.pack(">I", zlib.crc32(body))

    def fix_crc(self, data: bytes) -> bytes:
        """`data` with its last four bytes replaced by the CRC a reader checks."""
        if len(data) < 4:
            return data
        if not self.compact:
            return data[:-4] + struct.pack(">I", zlib.crc32(data[:-4]))
        if len(data) < container.COMPACT_OVERHEAD:
            return data
        _, _, _, width, height = container.COMPACT_FRAMING.unpack_from(data)
        return data[:-4] + self.compact_crc(width, height, data[container.COMPACT_FRAMING.size : -4])

    def describe(self) -> str:
        framing = f"compact(spec {self.spec_id})" if self.compact else "full"
        return f"case {self.case_id}: {self.seed.codec} [{self.seed.label}], {framing}: {'; '.join(self.steps)}"


def mutate_bits(case: Case, rng: random.Random, fix: bool) -> None:
    data = bytearray(case.data())
    flips = []
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        at = rng.randrange(len(data))
        bit = rng.randrange(8)
        data[at] ^= 1 << bit
        flips.append(f"{at}.{bit}")
    case.raw = case.fix_crc(bytes(data)) if fix else bytes(data)
    case.steps.append(f"flip bits {','.join(flips)}{' +crc' if fix else ''}")


def mutate_bytes(case: Case, rng: random.Random) -> None:
    data = bytearray(case.data())
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice(INTERESTING_BYTES + (rng.randrange(256),))
    case.raw = case.fix_crc(bytes(data))
    case.steps.append("overwrite bytes +crc")


def mutate_insert_delete(case: Case, rng: random.Random) -> None:
    data = case.data()
    at, n = rng.randrange(len(data) + 1), rng.choice((1, 1, 2, 4, 16, 300))
    if rng.random() < 0.5:
        data = data[:at] + rng.randbytes(n) + data[at:]
        what = f"insert {n} bytes at {at}"
    else:
        data = data[:at] + data[at + n :]
        what = f"delete {n} bytes at {at}"
    fix = rng.random() < 0.8
    case.raw = case.fix_crc(data) if fix else data
    case.steps.append(what + (" +crc" if fix else ""))


def mutate_truncate(case: Case, rng: random.Random) -> None:
    data = case.data()
    keep = rng.randrange(len(data))
    fix = rng.random() < 0.5
    case.raw = case.fix_crc(data[:keep]) if fix else data[:keep]
    case.steps.append(f"truncate to {keep}" + (" +crc" if fix else ""))


def mutate_size(case: Case, rng: random.Random) -> None:
    f = case.fields
    for side in rng.sample(("width", "height"), rng.choice((1, 2))):
        value = rng.choice((rng.choice(INTERESTING_SIDES), rng.randint(1, 512), getattr(f, side) + rng.choice((-1, 1))))
        setattr(f, side, value)
    if rng.random() < 0.1:
        f.width, f.height = f.height, f.width
    case.steps.append(f"size {f.width}×{f.height}")


def mutate_length(case: Case, rng: random.Random) -> None:
    true = len(case.fields.payload)
    case.fields.length = rng.choice((0, true - 1, true + 1, true * 2, 2**31, 2**32 - 1, rng.randrange(4096)))
    case.steps.append(f"payload length field {case.fields.length} (payload {true})")


def param_values(param) -> list:
    """Other settings a parameter allows, and some it does not."""
    if param.choices:
        return list(param.choices)
    values = [param.default]
    if param.minimum is not None:
        values += [param.minimum, param.minimum - 1 if param.kind is int else param.minimum / 2]
    if param.maximum is not None:
        values += [param.maximum, param.maximum + 1 if param.kind is int else param.maximum * 2]
    if param.kind is int:
        values += [0, 1, 2, 3, 5, 16, 64, 255, 256]
    if param.kind is float:
        values += [0.0, 1e-3, 0.5, 3.0]
    return [param.kind(v) if param.kind is not str else v for v in values]


def mutate_params(case: Case, rng: random.Random) -> None:
    """Hostile params JSON: not an object, nested, 1e999, wrong types, unknown keys, other valid settings."""
    if case.compact:
        params = dict(case.spec.params)
    else:
        try:
            params = dict(json.loads(case.fields.params))
        except (ValueError, TypeError, RecursionError):  # an earlier mutation left it unparseable: start again
            params = container.unpack(case.seed.stream)[0].params
    cls = codec_class(case.seed.codec)
    kind = rng.choices(
        ("setting", "value", "not-object", "nested", "unknown", "drop", "bytes"),
        weights=(6, 5, 1, 1, 1, 1, 1),
    )[0]
    if case.compact and kind in ("value", "nested", "bytes"):
        kind = "setting"  # a spec table comes from parsed JSON: only values JSON can hold
    text = None
    if kind == "setting":
        for param in rng.sample(cls.params, min(len(cls.params), rng.choice((1, 1, 2, 3)))):
            if not param.location:
                params[param.name] = rng.choice(param_values(param))
        what = f"params {json.dumps(params, sort_keys=True)}"
    elif kind == "value":
        key = rng.choice(sorted(params) or ["steps"])
        value = rng.choice(HOSTILE_VALUES)
        params[key] = None  # a placeholder the hostile token replaces in the text
        text = container.canonical_json(params).replace(f'"{key}":null'.encode(), f'"{key}":{value}'.encode())
        what = f"params {key}={value}"
    elif kind == "not-object":
        text = rng.choice((b"[]", b"[1,2]", b'"steps"', b"42", b"null", b"true", b"1e999"))
        what = f"params {text.decode()}"
    elif kind == "nested":
        depth = rng.choice((50, 1000, 5000, 30000))
        text = b'{"steps":' + b"[" * depth + b"]" * depth + b"}"
        what = f"params nested {depth} deep"
    elif kind == "unknown":
        params[rng.choice(("x", "tile ", "STEPS", ""))] = 1
        what = f"params {json.dumps(params, sort_keys=True)}"
    elif kind == "drop":
        if params:
            params.pop(rng.choice(sorted(params)))
        what = f"params {json.dumps(params, sort_keys=True)}"
    else:
        text = rng.choice((b"", b"{", b'{"steps":4', b"\xff\xfe", b'{"steps":4,"steps":5}', b"{}" + b" " * 70000))
        what = f"params bytes {text[:24]!r}"
    if case.compact:
        case.spec = replace(case.spec, params=params)
    else:
        case.fields.params = text if text is not None else container.canonical_json(params)
    case.steps.append(what)


def mutate_payload(case: Case, rng: random.Random, seeds: list[Seed]) -> None:
    """Payload edits with the framing (length field, CRC) made consistent."""
    payload = bytearray(case.fields.payload)
    kind = rng.choice(("flip", "set", "random", "truncate", "extend", "empty", "splice", "zeros", "ones"))
    if kind == "flip" and payload:
        for _ in range(rng.choice((1, 2, 8))):
            payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
    elif kind == "set" and payload:
        for _ in range(rng.randint(1, 4)):
            payload[rng.randrange(len(payload))] = rng.choice(INTERESTING_BYTES)
    elif kind == "random":
        payload = bytearray(rng.randbytes(len(payload)))
    elif kind == "truncate":
        payload = payload[: rng.randrange(len(payload) + 1)]
    elif kind == "extend":
        payload += rng.choice((b"\0", rng.randbytes(rng.choice((1, 3, 4, 64, 1000)))))
    elif kind == "empty":
        payload = bytearray()
    elif kind == "splice":
        other = rng.choice([s for s in seeds if s.codec == case.seed.codec])
        payload = bytearray(container.unpack(other.stream)[1])
    elif kind == "zeros":
        payload = bytearray(len(payload))
    else:
        payload = bytearray(b"\xff" * len(payload))
    case.fields.payload = bytes(payload)
    case.steps.append(f"payload {kind} ({len(payload)} bytes)")


def mutate_fit_payload(case: Case, rng: random.Random) -> None:
    """A payload of the length the codec's rate formula gives for the (mutated) header: a forgery that passes
    the length check and reaches the decoder's inner loops (codecs with a `payload_bits`, such as ddcm)."""
    decoder = case.seed.decoder
    try:
        params = case.spec.params if case.compact else json.loads(case.fields.params)
        bits = decoder.payload_bits(case.fields.height, case.fields.width, decoder.resolve_params(params))
    except Exception as exc:  # parameters or a size the formula cannot take: the decoder will say so
        case.steps.append(f"fit payload: none ({type(exc).__name__})")
        return
    size = -(-bits // 8)
    if size > 1 << 20:
        case.steps.append(f"fit payload: none ({size} bytes)")
        return
    kind = rng.choice(("zeros", "ones", "random"))
    case.fields.payload = {"zeros": bytes(size), "ones": b"\xff" * size, "random": rng.randbytes(size)}[kind]
    case.steps.append(f"fit payload: {size} bytes of {kind}")


def mutate_identity(case: Case, rng: random.Random) -> None:
    """The codec id, the fingerprint or the version byte."""
    f = case.fields
    kind = rng.choice(("codec", "fingerprint", "version"))
    if kind == "codec":
        f.codec = rng.choice([n.encode() for n in codec_names()] + [b"", b"x" * 255, b"\xff"])
        what = f"codec id {f.codec[:20]!r}"
    elif kind == "fingerprint":
        f.fingerprint = rng.choice((b"", bytes(32), rng.randbytes(32), f.fingerprint[:-1], f.fingerprint + b"\0"))
        what = f"fingerprint {f.fingerprint.hex()[:16]}… ({len(f.fingerprint)} bytes)"
    else:
        f.version = rng.choice((0, 2, 0x7F, 0x81, 0xFF))
        what = f"version byte {f.version}"
    if case.compact:
        case.spec = replace(case.spec, codec=f.codec.decode("latin-1"), fingerprint=f.fingerprint)
    case.steps.append(what)


def mutate_spec_id(case: Case, rng: random.Random) -> None:
    case.spec_id = rng.choice((1, 2, 0xFFFF))
    case.steps.append(f"spec id {case.spec_id}")


def build_case(case_id: int, run_seed: int, seeds: list[Seed]) -> Case:
    """The case `case_id` of the run `run_seed`: its own generator, so it comes out the same every time."""
    rng = random.Random(f"{run_seed}/{case_id}")
    codec = rng.choice(sorted({s.codec for s in seeds}))
    seed = rng.choice([s for s in seeds if s.codec == codec])
    fields = Fields.parse(seed.stream)
    case = Case(case_id, seed, fields)
    if rng.random() < COMPACT_SHARE:
        header = container.unpack(seed.stream)[0]
        case.compact, case.spec = True, header.spec
    # Field mutations first (any number), then at most one on the bytes (it ends the chain).
    field_mutations = [
        (3, lambda: mutate_size(case, rng)),
        (1, lambda: mutate_length(case, rng)),
        (5, lambda: mutate_params(case, rng)),
        (4, lambda: mutate_payload(case, rng, seeds)),
        (1, lambda: mutate_identity(case, rng)),
    ]
    if case.compact:
        field_mutations[1] = (0.3, lambda: mutate_spec_id(case, rng))  # no length field; a spec id instead
    if hasattr(seed.decoder, "payload_bits"):
        field_mutations.append((3, lambda: mutate_fit_payload(case, rng)))
    byte_mutations = [
        (1, lambda: mutate_bits(case, rng, fix=False)),
        (3, lambda: mutate_bits(case, rng, fix=True)),
        (2, lambda: mutate_bytes(case, rng)),
        (2, lambda: mutate_insert_delete(case, rng)),
        (1.5, lambda: mutate_truncate(case, rng)),
    ]
    count = rng.choices((1, 2, 3), weights=(70, 20, 10))[0]
    for index in range(count):
        on_bytes = rng.random() < 0.35 and index == count - 1
        table = byte_mutations if on_bytes else field_mutations
        rng.choices([m for _, m in table], weights=[w for w, _ in table])[0]()
    return case


def decode_case(case: Case, max_pixels: int):
    """What an archive's decoder does with the case's bytes."""
    data = case.data()
    if case.compact:
        data = container.expand(data, {0: case.spec})
    return case.seed.decoder.decode([data], max_pixels=max_pixels)


# ---------------------------------------------------------------------------------------------- workers


def classify(exc: BaseException) -> str:
    if isinstance(exc, BitstreamError):
        return "refused"
    message = str(exc)
    if isinstance(exc, MemoryError) or "can't allocate memory" in message or "not enough memory" in message:
        return "over-memory"
    return f"error:{type(exc).__name__}"


def serve(conn, seeds: list[Seed], run_seed: int, max_pixels: int, memory_mb: int, timeout: float) -> None:
    """A worker: cases in, (case id, outcome, CPU seconds, peak RSS MB, detail) out, until None arrives.
    A case over `timeout` CPU seconds ends the worker with SIGXCPU (RLIMIT_CPU)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the run; a ^C must not count as an abort
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # and a worker busy in a hang dies with it
    if memory_mb:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = virtual_memory_bytes() + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    while (case_id := conn.recv()) is not None:
        before = peak_rss_mb()
        case = build_case(case_id, run_seed, seeds)  # outside the try: a fuzzer bug must not pass as a finding
        started = cpu_seconds()
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(started + timeout), cpu_hard))
        try:
            decode_case(case, max_pixels)
            outcome, detail = "decoded", ""
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a Rust panic arrives as a BaseException; it counts, too
            outcome, detail = classify(exc), f"{type(exc).__name__}: {str(exc)[:200]}"
        peak = peak_rss_mb()
        conn.send((case_id, outcome, cpu_seconds() - started, peak if peak > before else 0, detail))


def cpu_seconds() -> float:
    return time.process_time()  # what RLIMIT_CPU counts: user and system time of this process


def virtual_memory_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * resource.getpagesize()


def peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


@dataclass
class Result:
    case_id: int
    codec: str
    outcome: str
    seconds: float
    peak_mb: int = 0
    detail: str = ""


class Worker:
    def __init__(self, context, seeds, run_seed, max_pixels, memory_mb, timeout):
        self.conn, child = context.Pipe()
        args = (child, seeds, run_seed, max_pixels, memory_mb, timeout)
        self.process = context.Process(target=serve, args=args, daemon=True)
        self.process.start()
        child.close()
        self.case_id: int | None = None
        self.started = 0.0

    def give(self, case_id: int) -> None:
        self.conn.send(case_id)
        self.case_id, self.started = case_id, time.perf_counter()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def run(cases: range, seeds: list[Seed], run_seed: int, workers: int, timeout: float, max_pixels: int,
        memory_mb: int, on_result) -> None:  # fmt: skip
    """Every case through a pool of forked workers; a hang or a death is recorded and the worker replaced."""
    context = multiprocessing.get_context("fork")
    spawn = lambda: Worker(context, seeds, run_seed, max_pixels, memory_mb, timeout)  # noqa: E731
    wall_timeout = 30 * timeout  # the clock's safety net, for a worker stuck without using CPU
    codec_of = lambda case_id: build_case(case_id, run_seed, seeds).seed.codec  # noqa: E731
    pending = iter(cases)
    pool = [spawn() for _ in range(min(workers, len(cases)))]
    for worker in pool:
        worker.give(next(pending))
    try:
        while any(w.case_id is not None for w in pool):
            busy = [w for w in pool if w.case_id is not None]
            deadline = min(w.started for w in busy) + wall_timeout
            ready = wait([w.conn for w in busy], timeout=max(0.0, deadline - time.perf_counter()))
            for index, worker in enumerate(pool):
                if worker.case_id is None:
                    continue
                finished = None
                if worker.conn in ready:
                    try:
                        case_id, outcome, seconds, peak, detail = worker.conn.recv()
                        finished = Result(case_id, codec_of(case_id), outcome, seconds, peak, detail)
                    except (EOFError, OSError):
                        worker.process.join(5)
                        code = worker.process.exitcode
                        if code == -signal.SIGXCPU:
                            outcome, why = "hang", f"> {timeout} CPU s"
                        else:
                            outcome = "abort"
                            why = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"
                        finished = Result(worker.case_id, codec_of(worker.case_id), outcome, timeout, 0, why)
                elif time.perf_counter() - worker.started >= wall_timeout:
                    finished = Result(worker.case_id, codec_of(worker.case_id), "hang", timeout, 0, f"> {wall_timeout} s on the clock")
                if finished is None:
                    continue
                on_result(finished)
                if finished.outcome in ("abort", "hang"):
                    worker.stop()
                    worker = pool[index] = spawn()
                worker.case_id = None
                next_case = next(pending, None)
                if next_case is not None:
                    worker.give(next_case)
    finally:
        for worker in pool:
            try:
                worker.conn.send(None)
            except OSError:
                pass
            worker.stop()


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Tally:
    outcomes: dict = field(default_factory=lambda: defaultdict(Counter))  # codec → outcome → count
    seconds: Counter = field(default_factory=Counter)  # codec → worker seconds
    slowest: dict = field(default_factory=dict)  # codec → (seconds, case id), among answered cases
    peak: dict = field(default_factory=dict)  # codec → (MB, case id)
    examples: dict = field(default_factory=lambda: defaultdict(list))  # (codec, outcome) → [(case id, detail)]

    def add(self, r: Result, keep: int) -> None:
        self.outcomes[r.codec][r.outcome] += 1
        self.seconds[r.codec] += r.seconds
        if r.outcome not in ("hang", "abort") and r.seconds > self.slowest.get(r.codec, (0, 0))[0]:
            self.slowest[r.codec] = (r.seconds, r.case_id)
        if r.peak_mb > self.peak.get(r.codec, (0, 0))[0]:
            self.peak[r.codec] = (r.peak_mb, r.case_id)
        if r.outcome not in GOOD and len(self.examples[(r.codec, r.outcome)]) < keep:
            self.examples[(r.codec, r.outcome)].append((r.case_id, r.detail))

    def bad(self) -> int:
        return sum(n for counts in self.outcomes.values() for o, n in counts.items() if o not in GOOD)

    def table(self) -> str:
        codecs = sorted(self.outcomes)
        outcomes = [o for o in GOOD] + sorted({o for c in self.outcomes.values() for o in c} - set(GOOD))
        width = max([len(o) for o in outcomes] + [24])
        cols = [max(len(c), 8) for c in codecs]
        lines = [f"{'outcome':<{width}} " + " ".join(f"{c:>{w}}" for c, w in zip(codecs, cols)) + f" {'total':>8}"]
        for outcome in outcomes:
            row = [self.outcomes[c][outcome] for c in codecs]
            lines.append(f"{outcome:<{width}} " + " ".join(f"{n:>{w}}" for n, w in zip(row, cols)) + f" {sum(row):>8}")
        totals = [sum(self.outcomes[c].values()) for c in codecs]
        lines.append(f"{'cases':<{width}} " + " ".join(f"{n:>{w}}" for n, w in zip(totals, cols)) + f" {sum(totals):>8}")
        rate = [f"{n / self.seconds[c]:.1f}" if self.seconds[c] else "-" for n, c in zip(totals, codecs)]
        lines.append(f"{'cases/s per worker':<{width}} " + " ".join(f"{r:>{w}}" for r, w in zip(rate, cols)))
        slow = [f"{self.slowest.get(c, (0, 0))[0]:.2f}" for c in codecs]
        lines.append(f"{'slowest answered case, CPU s':<{width}} " + " ".join(f"{s:>{w}}" for s, w in zip(slow, cols)))
        peak = [str(self.peak.get(c, (0, 0))[0]) for c in codecs]
        lines.append(f"{'peak worker RSS, MB':<{width}} " + " ".join(f"{p:>{w}}" for p, w in zip(peak, cols)))
        return "\n".join(lines)


def replay(case_id: int, run_seed: int, seeds: list[Seed], max_pixels: int, save: str | None) -> None:
    case = build_case(case_id, run_seed, seeds)
    print(case.describe())
    if save:
        data = case.data()
        with open(save, "wb") as handle:
            handle.write(container.expand(data, {0: case.spec}) if case.compact else data)
        print(f"wrote {save}")
    started = time.perf_counter()
    try:
        decode_case(case, max_pixels)
        print("decoded")
    except Exception as exc:
        traceback.print_exc()
        print(f"outcome: {classify(exc)}")
    print(f"{time.perf_counter() - started:.3f} s, peak RSS {peak_rss_mb()} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="how many cases (default 2000)")
    parser.add_argument("--first", type=int, default=0, help="id of the first case (to continue a run)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: with a case id, names one case")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="CPU seconds before a case counts as a hang")
    parser.add_argument("--memory-mb", type=int, default=2048, help="address space a worker may add (RLIMIT_AS)")
    parser.add_argument("--max-pixels", type=int, default=128 * 128, help="the decoder's pixel limit")
    parser.add_argument("--codec", action="append", help="only this codec (repeatable); default: every registered one")
    parser.add_argument("--examples", type=int, default=3, help="failing case ids kept per codec and outcome")
    parser.add_argument("--json", dest="json_path", help="write the counts and examples here")
    parser.add_argument("--replay", type=int, help="run this one case here and show what it is and what it raised")
    parser.add_argument("--save", help="with --replay: write the case's stream here")
    args = parser.parse_args()

    names = args.codec or codec_names()
    started = time.perf_counter()
    seeds, skipped = make_seeds(names)
    for name, reason in skipped.items():
        print(f"skipped {name}: no seed stream ({reason})", file=sys.stderr)
    if not seeds:
        sys.exit("no codec could make a seed stream")
    if args.replay is not None:
        replay(args.replay, args.seed, seeds, args.max_pixels, args.save)
        return
    print(f"{len(seeds)} seed streams from {len(names) - len(skipped)} codecs in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)  # fmt: skip

    tally = Tally()
    cases = range(args.first, args.first + args.cases)
    started = time.perf_counter()
    done = [0]

    def on_result(result: Result) -> None:
        tally.add(result, args.examples)
        done[0] += 1
        if sys.stderr.isatty() and done[0] % 50 == 0:
            print(f"\r{done[0]}/{len(cases)} cases, {tally.bad()} bad", end="", file=sys.stderr)

    run(cases, seeds, args.seed, args.workers, args.timeout, args.max_pixels, args.memory_mb, on_result)
    seconds = time.perf_counter() - started
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"{len(cases)} cases (seed {args.seed}, ids {cases.start}…{cases.stop - 1}) in {seconds:.0f} s: "
          f"{len(cases) / seconds:.1f} cases/s with {args.workers} workers; timeout {args.timeout} s, "
          f"memory cap +{args.memory_mb} MB, max_pixels {args.max_pixels}")  # fmt: skip
    print(tally.table())
    for (codec, outcome), found in sorted(tally.examples.items()):
        for case_id, detail in found:
            print(f"  {codec} {outcome}: --replay {case_id} --seed {args.seed}  {detail[:150]}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({
                "cases": len(cases), "seed": args.seed, "first": cases.start, "seconds": seconds,
                "workers": args.workers, "timeout": args.timeout, "memory_mb": args.memory_mb,
                "max_pixels": args.max_pixels, "skipped": skipped,
                "outcomes": {c: dict(o) for c, o in tally.outcomes.items()},
                "bad": tally.bad(),
                "examples": [{"codec": c, "outcome": o, "case": i, "detail": d}
                             for (c, o), found in sorted(tally.examples.items()) for i, d in found],
            }, handle, indent=1)  # fmt: skip
    sys.exit(1 if tally.bad() else 0)


if __name__ == "__main__":
    main()
