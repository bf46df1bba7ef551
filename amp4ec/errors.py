"""The one exception root of amp4ec and the errors the command line maps to exit statuses."""

from __future__ import annotations


class Amp4ecError(Exception):
    """Root of every error amp4ec raises on purpose; the CLI prints it without a traceback."""

    exit_status = 1


class UsageError(Amp4ecError):
    """Invalid input from the user: a scenario field, a file, an option. Exit status 2."""

    exit_status = 2

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None):
        self.field = field
        self.source = source
        prefix = ""
        if source:
            prefix += f"{source}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


class FileFormatError(UsageError):
    """A data file (graph, calibration, records) that is corrupt or of another schema version."""


class DockerError(Amp4ecError):
    """The Docker engine is unreachable or a container operation failed."""


class WorkerError(Amp4ecError):
    """A worker container returned an error or stopped answering."""

    def __init__(self, message: str, *, node: str | None = None, disconnected: bool = False):
        self.node = node
        self.disconnected = disconnected
        """the worker closed its connection: its process ended or its container stopped"""
        super().__init__(f"worker {node}: {message}" if node else message)


def validation_problems(exc, *, limit: int = 3, locate=None) -> str:
    """Return a pydantic ValidationError's problems on one line: ``location: message``, at most ``limit`` of them.

    ``locate`` turns an error's location tuple into text; by default its parts are joined with dots.
    """
    problems = []
    for error in exc.errors():
        location = locate(error["loc"]) if locate is not None else ".".join(map(str, error["loc"])) or "(top level)"
        # Errors raised in validators come as "Value error, <message>"; the message is enough.
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{location}: {message[:1].lower()}{message[1:]}")
    text = "; ".join(problems[:limit])
    if len(problems) > limit:
        text += f" (and {len(problems) - limit} more)"
    return text


class OversubscriptionWarning(UserWarning):
    """The containers of a run ask for more CPU than the machine has to spare."""
