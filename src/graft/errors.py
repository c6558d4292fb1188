"""User-facing errors: each says what is wrong and how to fix it.

The CLI prints any ``GraftError`` as one or two sentences on stderr (no traceback unless
``--debug``). Anything else escaping is a bug in graft.
"""


class GraftError(Exception):
    """A problem the user can fix (bad input, bad config, missing file)."""


class ConfigError(GraftError):
    """A config key that is unknown, has the wrong type, or conflicts with another."""


class DataError(GraftError):
    """A dataset folder, class folder or image file that cannot be used."""


class WeightsError(GraftError):
    """Weights that cannot be loaded into the requested model."""


class SnapshotError(GraftError):
    """A snapshot or finished run that cannot be resumed or loaded."""


class ExportError(GraftError):
    """An export that could not be written, or that disagrees with the model it came from."""


class DiskFullError(GraftError, OSError):
    """A file that could not be written for want of space (or a file size limit); ``path`` and the
    rough ``needed`` bytes say which and how much. Nothing was half-written."""

    def __init__(self, message: str, *, path=None, needed: int = 0) -> None:
        GraftError.__init__(self, message)
        self.path, self.needed = path, needed

    def __str__(self) -> str:
        return self.args[0]


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C); a resumable snapshot was written (``snapshot``, or
    None when there was nothing to resume yet)."""

    def __init__(self, snapshot: str | None) -> None:
        super().__init__(snapshot)
        self.snapshot = snapshot
