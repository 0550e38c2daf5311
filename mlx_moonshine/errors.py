"""User-facing errors: one message that names the bad thing and the fix.

The CLI prints `str(err)` and exits with `err.exit_code` (2), no traceback.
"""

from __future__ import annotations


class MoonshineError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched adapter...)."""

    exit_code = 2


class AudioError(MoonshineError):
    """An audio file that is missing, unreadable, empty or otherwise unusable."""


class ManifestError(MoonshineError):
    """One or more bad manifest rows; the message lists every one."""


class ModelError(MoonshineError):
    """A model or adapter directory that cannot be loaded as asked."""


class OutputError(MoonshineError):
    """An output file that cannot be written (disk full, file-size limit, permissions)."""


class RunLockedError(MoonshineError):
    """A run folder that another live process is writing into."""
