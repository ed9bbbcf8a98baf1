"""Build script. The native extension resfast._C is optional: a pure-Python install always succeeds."""

from setuptools import setup

setup()
