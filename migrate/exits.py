"""The exit codes of the `migrate` commands, in one place: cli returns them,
docs/operations.md ("Exit codes") lists them, tests check each from a real
run. An error carries its code (`exit_code` on the exception class); `of`
reads it."""

from __future__ import annotations

COMPLETED = 0      # the migration completed (dest: also stopped by SIGTERM or SIGINT)
FAILED = 1         # it failed; the `error` event says why
USAGE = 2          # it could not start: bad arguments, files, flags, addresses
GUEST_LOST = 3     # the destination guest went away: nothing is left to migrate into
WINDOW_OVER = 4    # source: the destination stayed lost for the whole --recovery-window
PRECOPY_ABANDONED = 5   # source --precopy: it failed before the switch; the source guest runs on, untouched
# source: stopped by SIGTERM or SIGINT mid-migration, the shell's 128 + the
# signal's number (143, 130): it stopped pushing, its QEMU stays paused
STOPPED_BASE = 128


def of(exc: BaseException) -> int:
    """The exit code an error ends a command with."""
    return getattr(exc, "exit_code", FAILED)
