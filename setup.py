# cffi_modules and the shim extension cannot be declared in pyproject.toml alone.
from setuptools import Extension, setup

setup(
    cffi_modules=["native/build_native.py:ffibuilder"],
    # The LD_PRELOAD shim for QEMU (native/shim.c). Built as an "extension" only so
    # that pip install and pip install -e place it in the package; it is never
    # imported and needs no Python symbols (`migrate shim-path` finds the file).
    ext_modules=[Extension("migrate._shim", sources=["native/shim.c"], libraries=["dl", "pthread"],
                           extra_compile_args=["-O2", "-std=gnu11", "-Wall"])],
)
