"""migrate: a VM live-migration post-copy engine on userfaultfd MINOR faults.

The package by side (docs/design.md is the reference):
- shared, below the sides: errors, host (probe), hugepages, uffd, memory (the
  guest's RAM file mapped twice), pagestate (bitmaps), report (events);
- wire/: what travels between processes (the agents' protocol, TCP, attach);
- dest/: the destination agent; source/: the source agent;
- qemu/: QEMU on either side; sim/: the simulated VM and local harness;
- cli: parsing and wiring only.
"""

__version__ = "0.1.0"
