"""The packaged ``.sql`` files, and the one place that reads them.

Every module that runs packaged SQL goes through :func:`text` and
:func:`files`, so the package's layout is known here only.
"""

from __future__ import annotations

from importlib import resources


def text(relpath: str) -> str:
    """Text of one packaged ``.sql`` file, ``relpath`` relative to this package (e.g. ``"macros/cone.sql"``)."""
    return resources.files(__name__).joinpath(relpath).read_text()


def files(folder: str = "") -> list[str]:
    """Relative names of the ``.sql`` files in ``folder`` ("" = top level), in file-name order; [] if it is absent."""
    root = resources.files(__name__)
    sub = root.joinpath(folder) if folder else root
    if not sub.is_dir():
        return []
    names = sorted(f.name for f in sub.iterdir() if f.name.endswith(".sql"))
    return [f"{folder}/{name}" if folder else name for name in names]
