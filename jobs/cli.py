"""`diffarc`: the one command users call. Each subcommand parses its arguments and calls the pipeline.

Exit codes (all commands):
  0  everything succeeded
  1  the job could not run (no such source or archive, incompatible archive, bad parameter value, unexpected
     error); an expected failure is one sentence on stderr, `diffarc --debug …` shows its traceback
  2  bad usage (unknown option, malformed value)
  3  the job completed, but some items failed (they are listed in the summary / failure table)
  4  verify only: the archive is intact but some items are below a quality threshold
  130  interrupted (Ctrl-C): finished work is kept, and the same command resumes
"""

from __future__ import annotations

import click

from .bench import bench
from .cat import cat
from .codecs import list_codecs
from .decode import decode
from .encode import encode
from .info import info
from .models import models
from .options import ErrorPolicyGroup
from .train import train
from .verify import verify


@click.group(cls=ErrorPolicyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffarc")
@click.option("--debug", is_flag=True, help="Show the traceback of an expected failure too, not only its sentence.")
def main(debug: bool) -> None:
    """Recompress image archives with diffusion codecs on Ray, and get them back."""


for command in (encode, decode, verify, info, cat, list_codecs, bench, train, models):
    main.add_command(command)

if __name__ == "__main__":
    main()
