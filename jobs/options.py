"""What every command shares: option declarations, value parsers, progress, logging, output, and the
error policy.

Command modules import nothing heavy at the top; the pipeline (torch, Ray, pyarrow) is imported inside
each command, so that `--help` and usage errors answer at once.

Stdout carries a command's result and nothing else (`result_stream`): while a command runs, sys.stdout
is stderr, so Ray's messages or a library's print cannot end up inside the JSON a program parses.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, Callable

import click

EXIT_ITEMS_FAILED = 3
EXIT_BELOW_THRESHOLD = 4
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)
INTERRUPTED = ("interrupted: what was finished is kept (encode: every committed shard; decode: every image written), "
               "and running the same command again resumes from there")  # fmt: skip


def parse_params(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    """`--param K=V …` as a dict; a value without `=` is a usage error (exit 2)."""
    params = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected K=V, got {value!r}")
        params[name.strip()] = setting.strip()
    return params


def parse_storage_options(ctx, param, value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        options = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"anon\": true}'")
    return options


LOG_LEVELS = ("debug", "info", "warning", "error")
PROGRESS_SECONDS_ENV = "DIFFARC_PROGRESS_SECONDS"
logger = logging.getLogger("diffarc")


def set_log_level(ctx, param, value: str) -> str:
    """--log-level: diffarc's log lines, on stderr, from this level up; debug also lets Ray speak."""
    logger.setLevel(value.upper())
    for handler in list(logger.handlers):  # a previous command's, bound to the stderr it had
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    # fsspec's event loop reports each request an outage cut off (and diffarc retried) as "Task exception
    # was never retrieved", with a traceback: noise, unless debugging.
    logging.getLogger("asyncio").setLevel(logging.WARNING if value.lower() == "debug" else logging.CRITICAL)
    return value


def log_level_option() -> click.Option:
    return click.Option(
        ["--log-level"], type=click.Choice(LOG_LEVELS, case_sensitive=False), default="info", show_default=True,
        envvar="DIFFARC_LOG_LEVEL", expose_value=False, is_eager=True, callback=set_log_level,
        help=f"Progress (when stderr is no terminal: a line every {PROGRESS_SECONDS_ENV}, 30 s) and notices at "
        "info; debug adds Ray's own messages and its workers' output.",
    )


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def describe_progress(label: str, unit: str, done: int, total: int | None, failed: int, elapsed: float) -> str:
    """'encode: 120/1000 (12%), 3 failed, 4.20 images/s, ETA 3m 29s, 28s elapsed'; no ETA without a total."""
    rate = done / elapsed if elapsed > 0 else 0.0
    words = [f"{label}: {done}/{total} ({100 * done / total:.0f}%)" if total else f"{label}: {done}",
             f"{failed} failed", f"{rate:.2f} {unit}/s"]  # fmt: skip
    if total and done < total:
        words.append(f"ETA {format_duration((total - done) / rate)}" if rate > 0 else "ETA unknown")
    words.append(f"{format_duration(elapsed)} elapsed")
    return ", ".join(words)


class Progress:
    """How far a job is, on stderr, at --log-level info or below; a context manager around the job.

    On a terminal: one line redrawn in place every second, with the rate and the ETA. Otherwise (CI,
    Kubernetes, a log file): a log line every DIFFARC_PROGRESS_SECONDS (30 s) while the job runs, also
    when no result has arrived since (a long shard), so a silent log means a stuck job, not a slow one.
    A job shorter than that logs none: its summary says the rest.
    """

    def __init__(self, label: str, unit: str = "images"):
        self.label, self.unit = label, unit
        self.stream = sys.stderr
        self.live = self.stream.isatty()
        self.interval = 1.0 if self.live else progress_seconds()
        self.enabled = logger.isEnabledFor(logging.INFO)
        self.started = time.monotonic()
        self.counts: tuple[int, int | None, int] = (0, None, 0)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="diffarc-progress", daemon=True)

    def __enter__(self) -> Progress:
        if self.enabled:
            self.ticker.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        if self.ticker.is_alive():
            self.ticker.join()
        if self.enabled and self.live:
            with self.lock:
                self._show()
                click.echo(file=self.stream)

    def __call__(self, done: int, total: int | None, failed: int) -> None:
        with self.lock:  # one writer at a time: a result arriving and the ticker
            self.counts = (done, total, failed)
            if self.enabled and self.live:
                self._show()

    def _tick(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                if self.live:
                    self._show()
                else:
                    logger.info(self._line())

    def _line(self) -> str:
        done, total, failed = self.counts
        return describe_progress(self.label, self.unit, done, total, failed, time.monotonic() - self.started)

    def _show(self) -> None:
        click.echo(f"\r{self._line()}\x1b[K", file=self.stream, nl=False)


def progress_seconds() -> float:
    value = os.environ.get(PROGRESS_SECONDS_ENV, "30")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise click.UsageError(f"{PROGRESS_SECONDS_ENV}={value!r} is not a positive number of seconds")
    return seconds


RESULT_STREAM = "diffarc.result_stream"


def result_stream():
    """The stdout the running command started with: the only place its result goes."""
    context = click.get_current_context(silent=True)
    return context.meta.get(RESULT_STREAM, sys.stdout) if context else sys.stdout


def with_stdout_for_results(callback: Callable) -> Callable:
    """A command callback run with sys.stdout pointing at stderr (see `result_stream`); the Ray it started
    or joined is left before stdout is given back, so that Ray's parting messages go to stderr too."""

    @functools.wraps(callback)
    def run(*args, **kwargs):
        click.get_current_context().meta[RESULT_STREAM] = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            try:
                return callback(*args, **kwargs)
            finally:
                if "ray" in sys.modules:
                    from ..pipeline.cluster import disconnect

                    disconnect()

    return run


def emit(as_json: bool, document: dict, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(document, default=str), file=result_stream())
    else:
        for line in lines:
            click.echo(line, file=result_stream())


class ErrorPolicyGroup(click.Group):
    """A click group that runs each of its commands under diffarc's one error policy.

    An expected failure (a DiffarcError, or a storage failure: missing bucket, no credentials, no
    permission), raised here or in a Ray actor, prints one sentence on stderr and exits 1; usage errors
    are click's and exit 2; anything else is a bug and shows its traceback (exit 1). With the group's
    `--debug`, expected failures show their traceback too.

    Every command added gets `--log-level` and keeps stdout for its result (`with_stdout_for_results`).
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.append(log_level_option())
        cmd.callback = with_stdout_for_results(cmd.callback)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # click would say only "Aborted!"
            click.echo(f"\n{INTERRUPTED}", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors and --help: click's, and answered without importing the pipeline
        except Exception as exc:
            sentence = None if ctx.params.get("debug") else expected_failure(exc)
            if sentence is None:
                raise
            raise click.ClickException(sentence) from None


def expected_failure(exc: BaseException) -> str | None:
    """The sentence that explains an expected failure, or None when `exc` is a bug (or click's own)."""
    from ..codecs.errors import DiffarcError
    from ..pipeline.storage_failures import describe_storage_failure

    # Ray wraps what an actor raised (`cluster.unwrapped`); an actor constructor's exception is only text
    # that ends in the original "module.Class: message".
    if "ray" in sys.modules:
        from ..pipeline.cluster import unwrapped

        exc = unwrapped(exc)
    if isinstance(exc, DiffarcError):
        return str(exc)
    if type(exc).__module__.startswith("ray.") and getattr(exc, "actor_init_failed", False):
        found = re.findall(r"diffarc\.codecs\.errors\.\w+: ([^\n]+)", getattr(exc, "error_msg", ""))
        return found[-1].strip() if found else None
    return describe_storage_failure(exc)


storage_option = click.option(
    "--storage-options", callback=parse_storage_options,
    help="JSON object passed to fsspec (e.g. S3 endpoint/credentials); AWS_* env vars also work.",
)
address_option = click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join; default: a local one.")
actors_option = click.option("--actors", type=int, help="Codec actors; default one per GPU, else one per CPU.")
model_option = click.option(
    "--model", help="Weights to decode with (folder, builtin:NAME, URL), tried first; accepted only if their "
    "fingerprint is the archive's. Default: the archive's models/, the local model cache, the built-in weights "
    "(and with --trust-hint, the location recorded when encoding).",
)
trust_hint_option = click.option(
    "--trust-hint", is_flag=True,
    help="Also look for the weights where the archive says they were when it was encoded (a folder, URL or hub "
    "id). Off by default: an archive from elsewhere could name any place to list or fetch.",
)
decode_params_option = click.option(
    "--param", "params", multiple=True, metavar="K=V", callback=parse_params,
    help="A decode-time codec parameter, for every image (repeatable), e.g. corrdiff's perception=0.",
)
max_pixels_option = click.option(
    "--max-pixels", type=click.IntRange(1),
    help="Refuse streams declaring more pixels than this or costing more to decode than such an image (and, for "
    "verify, originals larger than it); default: the archive's encode limit.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")


def decoding_options(command):
    """The options every command that decodes an archive's streams takes (decode, verify)."""
    options = (model_option, trust_hint_option, max_pixels_option, actors_option, address_option, storage_option, json_option)
    for option in reversed(options):
        command = option(command)
    return command
