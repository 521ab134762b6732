"""Every error diffarc expects is a DiffarcError: its message is one plain sentence a user can act on.

The command line prints that sentence and exits 1 (see jobs/); anything else is a bug and shows its
traceback. The classes below say what went wrong, so callers can handle one kind and let others pass.
Each also derives from the built-in exception it used to be, so `except ValueError` keeps working.
"""

from __future__ import annotations


class DiffarcError(Exception):
    """An expected failure: bad input, a missing or incompatible file, a refused request."""


class ParameterError(DiffarcError, ValueError):
    """A codec parameter, preset or option value that is not allowed."""


class UnknownCodecError(ParameterError):
    """A codec name the registry does not know."""


class BitstreamError(DiffarcError, ValueError):
    """A stream that cannot be decoded: damaged, truncated, foreign, too new, or for other weights."""


class EntropyCodingError(DiffarcError, ValueError):
    """Symbols outside what a range coder's tables can code, or coded data that does not decode."""


class ModelError(DiffarcError, ValueError):
    """A model reference that cannot be resolved or loaded; the message says which and why."""


class ArchiveError(DiffarcError, RuntimeError):
    """The archive itself is missing, foreign, damaged or incompatible with the job asked for."""


class ImageLoadError(DiffarcError, ValueError):
    """Bytes that do not load as an image within the loader's limits; the message is the recorded reason."""


class SourceError(DiffarcError, FileNotFoundError):
    """A source folder, bucket or list file that cannot be listed."""


class ClusterError(DiffarcError, ConnectionError):
    """A Ray cluster that cannot be joined, or a Ray of the job's own that did not start."""


class StorageError(DiffarcError, OSError):
    """A location that cannot be reached, listed, read or written: no bucket, no credentials, no permission."""
