"""Where the LD_PRELOAD shim for an unmodified QEMU (native/shim.c) was built."""

from __future__ import annotations

import importlib.util
import os

from migrate.errors import MigrateError


def shim_path() -> str:
    """Absolute path of the built LD_PRELOAD shim (native/shim.c as migrate._shim).
    Found without importing it: it is a plain shared library, not a Python module."""
    spec = importlib.util.find_spec("migrate._shim")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        raise MigrateError("the QEMU shim (migrate._shim) is not built: reinstall the package "
                           "(pip install -e .) with a C compiler available")
    return os.path.abspath(spec.origin)
