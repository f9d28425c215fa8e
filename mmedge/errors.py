"""The one exception type that reaches users.

Everything a user can get wrong (a path, an image, a flag, a package) raises
`MmedgeError` with a single line saying what is wrong and what to do. The CLI
prints that line and exits non-zero; it never prints a traceback for it.
"""


class MmedgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PackageError(MmedgeError):
    """A package directory is missing, incomplete, corrupt or of another format."""


class ExportError(MmedgeError):
    """Export could not produce a package (bad checkpoint, failed verification...)."""


class InputError(MmedgeError):
    """A bad image, prompt or option given at run time."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
