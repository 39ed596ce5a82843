"""r1fast's own recipes by their checkout path, from anywhere: the README names ``recipes/<name>.toml``, which
exists only in a checkout; a wheel install ships the same files as package data of ``r1fast.recipes``."""

from __future__ import annotations

import os
import sys
from importlib.resources import files


def installed_fallback(path: str) -> str:
    """``path``, or for a missing relative ``recipes/<name>`` that r1fast ships, the installed copy (one stderr
    line says so). Any other missing path is returned as is, for the caller's own "cannot read" error."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    head, name = os.path.split(os.path.normpath(path))
    installed = files("r1fast.recipes") / name
    if head != "recipes" or not installed.is_file():
        return path
    if os.environ.get("RANK", "0") == "0":
        print(f"r1fast: no {path} here; reading the recipe installed with r1fast, {installed}", file=sys.stderr)
    return str(installed)
