"""Typed exceptions. Each message names the operation, the range and the errno,
so a person can act on it (`register 0x7f..+1 GiB MINOR: EINVAL`)."""

from __future__ import annotations

import errno as _errno
import os
import threading

from migrate import exits

# How a socket ends when its peer's host or the network between went away (the
# kernel gave up on it), as opposed to a clean end or a local failure.
PEER_LOST_ERRNOS = frozenset((_errno.ETIMEDOUT, _errno.EHOSTUNREACH, _errno.ENETUNREACH, _errno.EHOSTDOWN,
                              _errno.ENETDOWN, _errno.ENETRESET, _errno.ECONNABORTED, _errno.ENOTCONN))


def fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def fmt_range(start: int, length: int) -> str:
    return f"{start:#x}+{fmt_size(length)}"


class MigrateError(Exception):
    """Base of every error this package raises on purpose. exit_code: what
    the command exits with when it ends on this error (migrate.exits)."""

    exit_code = exits.FAILED


class UnsupportedError(MigrateError):
    """The host lacks a feature (ENOSYS/EPERM from the kernel, or a probe said no)."""


class UffdError(MigrateError):
    """A userfaultfd operation failed."""

    def __init__(self, op: str, errno: int, start: int | None = None,
                 length: int | None = None, detail: str = ""):
        self.op = op
        self.errno = errno
        self.start = start
        self.length = length
        where = f" {fmt_range(start, length)}" if start is not None and length is not None else ""
        name = _errno.errorcode.get(errno, str(errno))
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{op}{where}: {name}: {os.strerror(errno)}{extra}")


class AlignmentError(UffdError):
    """Refused before the ioctl: the range does not fit the page size or mapping."""

    def __init__(self, op: str, start: int, length: int, detail: str):
        super().__init__(op, _errno.EINVAL, start, length, detail)


class MemoryBackendError(MigrateError):
    """Guest memory could not be created or mapped."""


class AttachError(MigrateError):
    """The guest side and the agent could not agree on an attach."""


class ProtocolError(MigrateError):
    """The peer sent something that breaks the wire contract."""


class LayoutMismatch(ProtocolError):
    """Source and destination disagree on RAM size or page size."""


class SourceError(MigrateError):
    """The migration could not be served; the message says why."""


class DestinationFailed(SourceError):
    """The destination ended the migration for good (its guest died, or the
    kernel refused a page): no source can finish it."""


class GuestLost(DestinationFailed):
    """The destination guest went away: nothing is left to migrate into."""

    exit_code = exits.GUEST_LOST


class DestinationLost(SourceError):
    """The destination went away or cannot be reached right now (its agent
    died or was stopped, it is restarting, its guest has not re-attached
    yet): a source within its --recovery-window tries again."""


class DestinationGone(DestinationLost):
    """The destination stopped answering (--dest-timeout): its guest keeps the
    pages it has and waits, and the message already says how to serve it the
    rest (`migrate source --resume SESSION`)."""


class RecoveryWindowOver(SourceError):
    """The destination stayed lost for the whole --recovery-window; the
    message says what state the VM is in and what to do."""

    exit_code = exits.WINDOW_OVER


class PrecopyAbandoned(SourceError):
    """Pre-copy failed before the switch (the destination or the link was
    lost, or it refused): nothing was mapped there, and the source guest runs
    on, unprotected. Not tried again: run the migration again."""

    exit_code = exits.PRECOPY_ABANDONED


class SourceGuestGone(SourceError):
    """The source guest of a pre-copy went away (its process exited): there
    is nothing left to migrate."""


class Stopped(SourceError):
    """The source was stopped by a signal (SIGTERM, SIGINT) mid-migration.

    The signal's handler raises it wherever the main thread is. When that is
    inside a finalizer (a __del__ the collector happened to run then, such
    as gRPC's), Python only prints it and goes on; the handler's hook for
    such exceptions keeps it in `swallowed`, and the source's waits raise it
    again (check)."""

    swallowed: Stopped | None = None

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = exits.STOPPED_BASE + signum

    @classmethod
    def check(cls) -> None:
        """Raises a signal's Stopped that a finalizer swallowed (once, and on
        the main thread only, where the handler would have raised it)."""
        if cls.swallowed is None or threading.current_thread() is not threading.main_thread():
            return
        e, cls.swallowed = cls.swallowed, None
        raise e
