"""Builds vqfast. The compiled extension vqfast._C (csrc/) arrives with the native backend."""

from setuptools import setup

setup()
