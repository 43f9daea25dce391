"""Import ``ard_sql.science`` modules on a machine that has only numpy, scipy and torch (a lent GPU machine).

``import ard_sql`` pulls in DuckDB and the rest of the package; the science
modules that the GPU benchmarks run (``shen``, ``specformer``, ``fastfit``,
``kinematics``, ``templates``) need only numpy, scipy and torch. Where
``ard_sql`` cannot be imported, an empty package object pointing at this
checkout's ``ard_sql/`` stands in for it.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def science(*names: str) -> list[types.ModuleType]:
    """The modules ``ard_sql.science.<name>`` for each name, importable without the package's dependencies."""
    if "ard_sql" not in sys.modules:
        try:
            import ard_sql  # noqa: F401
        except ImportError:
            pkg = types.ModuleType("ard_sql")
            pkg.__path__ = [str(_ROOT / "ard_sql")]
            sys.modules["ard_sql"] = pkg
    return [importlib.import_module(f"ard_sql.science.{n}") for n in names]
