"""Installed folders of the PyPI packages that carry a model or a data set."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_folder(package: str, pip_name: str) -> Path:
    """The installed folder of `package`, found without importing it (the packages' own imports
    need dependencies this project does not install)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name} is not installed: pip install --no-deps {pip_name} "
                                "(`make setup` does)")
    return Path(spec.submodule_search_locations[0])
