"""What every command shares: option declarations, value parsers, progress, output, and the error policy.

Command modules import nothing heavy at the top; the pipeline (torch, Ray, pyarrow) is imported inside
each command, so that `--help` and usage errors answer at once.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

EXIT_ITEMS_FAILED = 3
EXIT_BELOW_THRESHOLD = 4


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


class Progress:
    """A one-line counter on stderr, shown only when stderr is a terminal."""

    def __init__(self, label: str):
        self.label = label
        self.enabled = sys.stderr.isatty()

    def __call__(self, done: int, total: int | None, failed: int) -> None:
        if self.enabled:
            of = f"/{total}" if total is not None else ""
            click.echo(f"\r{self.label}: {done}{of} done, {failed} failed", err=True, nl=False)

    def close(self) -> None:
        if self.enabled:
            click.echo(err=True)


def emit(as_json: bool, document: dict, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(document, default=str))
    else:
        for line in lines:
            click.echo(line)


class ErrorPolicyGroup(click.Group):
    """A click group that runs each of its commands under diffarc's one error policy.

    An expected failure (a DiffarcError, or a storage failure: missing bucket, no credentials, no
    permission), raised here or in a Ray actor, prints one sentence on stderr and exits 1; usage errors
    are click's and exit 2; anything else is a bug and shows its traceback (exit 1). With the group's
    `--debug`, expected failures show their traceback too.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
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
    from ..pipeline.preflight import describe_storage_failure

    # Ray wraps what an actor raised: a method's exception as `.cause` (the wrapper's text is a
    # traceback), Ray Train a worker's in `.worker_failures`, an actor constructor's only as text that
    # ends in the original "module.Class: message".
    while type(exc).__module__.startswith("ray."):
        inner = getattr(exc, "cause", None)
        failures = getattr(exc, "worker_failures", None)
        if not isinstance(inner, BaseException) and isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
        if not isinstance(inner, BaseException):
            break
        exc = inner
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
    "fingerprint is the archive's. Default: the archive's models/, the local model cache, the recorded location.",
)
max_pixels_option = click.option(
    "--max-pixels", type=click.IntRange(1),
    help="Refuse streams declaring more pixels than this or costing more to decode than such an image (and, for "
    "verify, originals larger than it); default: the archive's encode limit.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")


def decoding_options(command):
    """The options every command that decodes an archive's streams takes (decode, verify)."""
    for option in reversed((model_option, max_pixels_option, actors_option, address_option, storage_option, json_option)):
        command = option(command)
    return command
