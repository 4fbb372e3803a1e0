"""The errors of the guest tooling, and how they carry diagnostics.

Every error a test sees about a guest should say what the guest and its QEMU
were doing: :func:`diagnosed` builds an error with that text appended and
marks it, so :func:`vuser.testing.guest.boot_guest` does not add the same
text again as a note on the way out.

This module imports nothing but the standard library: provisioning (which
runs before vuser's dependencies are installed) raises
:class:`NotProvisionedError` through :mod:`vuser.testing.manifest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "CommandResult",
    "DeviceExited",
    "GuestCommandError",
    "GuestError",
    "GuestExited",
    "GuestTimeout",
    "NotProvisionedError",
    "diagnosed",
    "is_diagnosed",
    "mark_diagnosed",
    "tail",
]

_MARK = "_vuser_diagnosed"


class GuestError(Exception):
    """Something went wrong with the guest or its QEMU."""


class NotProvisionedError(GuestError):
    """The cache lacks QEMU, a kernel or the manifest: run scripts/provision."""


class GuestExited(GuestError):
    """QEMU exited (or closed the command channel) while we waited on it."""


class DeviceExited(GuestError):
    """A ``vuser run`` process serving one of the guest's devices exited
    while the guest was in use (booting, or running a command)."""


class GuestTimeout(GuestError):
    """Boot or a command took longer than allowed."""

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class GuestCommandError(GuestError):
    """A command run by :meth:`Guest.check` (or ``run(..., check=True)``)
    exited with a non-zero status."""

    def __init__(self, result: CommandResult, diagnostics: str = "") -> None:
        super().__init__(
            f"guest command exited with {result.exit_code}: {result.command!r}\n"
            f"--- stdout ---\n{tail(result.stdout, 60)}\n"
            f"--- stderr ---\n{tail(result.stderr, 60)}"
            + (f"\n{diagnostics}" if diagnostics else ""))
        self.result = result


def tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def mark_diagnosed(exc: BaseException) -> None:
    """Note that ``exc`` already carries the guest's diagnostics."""
    try:
        setattr(exc, _MARK, True)
    except AttributeError:   # some built-in exceptions take no attributes
        pass


def is_diagnosed(exc: BaseException) -> bool:
    return bool(getattr(exc, _MARK, False))


def diagnosed(cls: type[GuestError], message: str, diagnostics: str, **kw: Any) -> GuestError:
    """``cls(message + diagnostics)``, marked as carrying them."""
    exc = cls(f"{message}\n{diagnostics}", **kw)
    mark_diagnosed(exc)
    return exc


@dataclass(frozen=True)
class CommandResult:
    """Outcome of one guest command.  ``stdout``/``stderr`` are the bytes
    decoded as UTF-8 with surrogateescape (lossless); ``*_bytes`` are raw."""

    command: str
    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "surrogateescape")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "surrogateescape")

    @property
    def returncode(self) -> int:
        """:attr:`exit_code` under its earlier name (kept for callers of
        the tooling from before the ``vuser_guest`` fixture)."""
        return self.exit_code

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> CommandResult:
        if self.exit_code != 0:
            raise GuestCommandError(self)
        return self
