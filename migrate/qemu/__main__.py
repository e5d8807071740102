"""`python -m migrate.qemu QMP_SOCKET COMMAND ['{json arguments}']`: one QMP
command by hand, e.g. `cont` to resume a paused source QEMU."""

from __future__ import annotations

import json

from migrate.errors import MigrateError
from migrate.qemu.qmp import QMP


def main(argv=None) -> int:
    """`python -m migrate.qemu QMP_SOCKET COMMAND ['{json arguments}']`, e.g. to
    resume a source QEMU by hand: `python -m migrate.qemu /run/src.qmp cont`."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(main.__doc__, file=sys.stderr)
        return 2
    try:
        q = QMP(argv[0])
        print(json.dumps(q.cmd(argv[1], **(json.loads(argv[2]) if len(argv) > 2 else {})), indent=2))
    except MigrateError as e:
        print(f"qmp: {e}", file=sys.stderr)
        return 1
    return 0
