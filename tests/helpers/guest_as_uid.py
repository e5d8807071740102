"""A guestsim of another uid, for tests/test_attacks_local.py: it creates its
RAM and userfaultfd while still root (an unprivileged process may not create
a userfaultfd that takes kernel faults here: vm.unprivileged_userfaultfd is
0), then becomes UID just before it attaches, so that the agent sees a guest
of UID on its socket (SO_PEERCRED records the uid at connect()).

    python guest_as_uid.py UID PYTHON -m migrate guestsim ARGS...

(the form a `migrate.sim.localrun.Proc` prefix gives: it runs the `migrate`
command line after it in this process).
"""

import os
import sys

uid = int(sys.argv[1])
if sys.argv[3:5] != ["-m", "migrate"]:
    sys.exit(f"usage: {sys.argv[0]} UID PYTHON -m migrate guestsim ARGS...")

# Everything guestsim imports later is imported now: as UID this process may
# no longer read the interpreter's own library (under /root here).
import migrate.cli  # noqa: E402
import migrate.sim.guestsim as guestsim  # noqa: E402
from migrate.wire.attach import GuestLink  # noqa: E402


class GuestLinkAsUid(GuestLink):
    def __init__(self, *args, **kwargs):
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        super().__init__(*args, **kwargs)


guestsim.GuestLink = GuestLinkAsUid
sys.exit(migrate.cli.main(sys.argv[5:]))
