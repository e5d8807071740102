# cffi_modules and the shim extension cannot be declared in pyproject.toml alone.
from setuptools import setup

setup(
    cffi_modules=["native/build_native.py:ffibuilder"],
)
