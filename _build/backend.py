"""PEP 517 backend: setuptools, but built against the torch already installed.

pip's build isolation hides the target environment's site-packages, so a plain `pip install .`
would either fail to import torch or, with torch in build requires, download a different torch
(often a CUDA build several GB large) and produce an extension whose C++ ABI does not match the
torch it will run with. Here the build sees the target environment's torch; only when there is
none does it ask pip for one.
"""
import importlib.util
import sys
import sysconfig

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the PEP 517 hooks)


def _expose_installed_torch():
    if importlib.util.find_spec("torch") is not None:
        return True
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in sys.path:
            sys.path.append(path)  # after the isolated env's own paths
    importlib.invalidate_caches()
    return importlib.util.find_spec("torch") is not None


_HAVE_TORCH = _expose_installed_torch()  # every hook below runs setup.py, which imports torch


# The static build requirements come from pyproject.toml.
def get_requires_for_build_wheel(config_settings=None):
    return [] if _HAVE_TORCH else ["torch"]


get_requires_for_build_editable = get_requires_for_build_wheel
