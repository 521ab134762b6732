"""What every command shares: option declarations, value parsers, progress, output, and the error policy."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

EXIT_ITEMS_FAILED = 3
EXIT_BELOW_THRESHOLD = 4


def parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected k=v, got {value!r}", param_hint="--param")
        params[name.strip()] = setting.strip()
    return params


def parse_storage_options(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        options = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--storage-options") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
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


def run_job(function, *args, **kwargs):
    """Run a pipeline call, turning the errors a user can act on into one clear line (exit code 1)."""
    from ..codecs.errors import ArchiveError

    try:
        return function(*args, **kwargs)
    except (ArchiveError, FileNotFoundError, ValueError, KeyError, PermissionError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise click.ClickException(f"{type(exc).__name__}: {message}") from None


storage_option = click.option(
    "--storage-options", help="JSON object passed to fsspec (e.g. S3 endpoint/credentials); AWS_* env vars also work."
)
address_option = click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join; default: a local one.")
actors_option = click.option("--actors", type=int, help="Codec actors; default one per GPU, else one per CPU.")
model_option = click.option(
    "--model", help="Weights to decode with (folder, builtin:NAME, URL), tried first; accepted only if their "
    "fingerprint is the archive's. Default: the archive's models/, the local model cache, the recorded location.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
