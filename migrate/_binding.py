"""The raw cffi module, loaded once, with a check that the build is current.

A stale `_native` (built from older C than this Python expects) fails here,
loudly, instead of misbehaving in an ioctl later.
"""

from __future__ import annotations

EXPECTED_NATIVE_VERSION = 6

try:
    from migrate._native import ffi, lib  # noqa: F401
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "migrate's native module is not built: run `pip install -e .` "
        f"(or `make test`) in the source tree ({exc})"
    ) from exc

if lib.mg_native_version() != EXPECTED_NATIVE_VERSION:  # pragma: no cover
    raise ImportError(
        f"migrate._native is version {lib.mg_native_version()}, the Python "
        f"package expects {EXPECTED_NATIVE_VERSION}: rebuild with `pip install -e .`"
    )
