"""setuptools shim: only here because cffi_modules is a setup() keyword."""
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
