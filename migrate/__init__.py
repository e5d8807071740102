"""migrate: a VM live-migration post-copy engine on userfaultfd MINOR faults.

Modules follow DESIGN.md: host (probe), uffd, memory (guest memory backends),
pagestate (bitmaps), faultpath (placement and the fault loop), attach (guest ->
agent), protocol (wire), source, destination, guestsim, ramimage, cli.
"""

__version__ = "0.1.0"
