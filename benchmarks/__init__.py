"""migrate's benchmark harness: `migrate bench` (see README.md)."""

import os

# numpy's OpenBLAS otherwise starts spinning worker threads in the harness and
# the benchmark guest, taking CPU from the agents being measured.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
