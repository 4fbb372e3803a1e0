# pyproject.toml cannot declare cffi modules; this only passes them on.
from setuptools import setup

setup(cffi_modules=["native/build_vring.py:ffibuilder"])
