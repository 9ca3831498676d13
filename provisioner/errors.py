"""One root error type and its few subclasses.

Every error provisioner raises on purpose derives from :class:`ProvisionerError`; the CLI turns
them into one-line messages and an exit code, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class ProvisionerError(Exception):
    """Root of every error raised on purpose by provisioner."""


@dataclass(frozen=True, slots=True)
class Location:
    """A place in a source file (1-based line and column); ``line`` 0 means the whole file."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about a spec: where, which field, what is wrong."""

    location: Location
    path: str
    message: str
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location.file else ""
        field = f"{self.path}: " if self.path else ""
        tag = "warning: " if self.severity == "warning" else ""
        return f"{where}{field}{tag}{self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.location.file,
            "line": self.location.line,
            "column": self.location.column,
            "path": self.path,
            "message": self.message,
            "severity": self.severity,
        }


class SpecError(ProvisionerError):
    """A fleet spec is invalid; carries every problem found, each with file:line and field."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: Sequence[Problem] = tuple(problems)
        first = str(self.problems[0]) if self.problems else "invalid fleet spec"
        more = len(self.problems) - 1
        super().__init__(first + (f" (and {more} more)" if more > 0 else ""))


class SecretError(ProvisionerError):
    """A secret reference could not be resolved. The message never holds the secret."""


class BmcError(ProvisionerError):
    """A BMC command failed, with a reason a person can act on:

    * ``unreachable``: nothing answered (no route, no listener, no session could start);
    * ``auth``: the BMC refused the user name or password;
    * ``timeout``: the BMC answered once but not to this command in time;
    * ``unsupported``: the BMC does not implement the request;
    * ``bmc-error``: the BMC answered with an error of its own (kept in the message).

    Messages come from the BMC or the transport and never hold the password.
    """

    REASONS = ("unreachable", "auth", "timeout", "unsupported", "bmc-error")

    def __init__(self, reason: str, message: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown BMC error reason {reason!r}")
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class PlaybookFailed(ProvisionerError):
    """An Ansible playbook run failed."""


class TerraformFailed(ProvisionerError):
    """A terraform command (``init``, ``workspace``, ``plan``, ``apply``, ``output``) failed,
    could not start (no terraform installed) or ran out of time.

    ``exit_code`` is None when terraform never ran or was stopped; ``stderr`` keeps the tail of
    what it printed. Neither, nor the message, ever holds a secret (the pg connection string).
    """

    def __init__(
        self, command: str, message: str, *, exit_code: int | None = None, stderr: str = ""
    ) -> None:
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr
        super().__init__(message)


class BurninFailed(ProvisionerError):
    """A burn-in run could not produce a result."""


class PlanStale(ProvisionerError):
    """A saved plan no longer matches the spec or the recorded state."""
