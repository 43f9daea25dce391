"""Every command, view, macro and SQL function is documented in docs/reference.md."""

from __future__ import annotations

import re
from pathlib import Path

import ard_sql
from ard_sql.cli import app

REFERENCE = (Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text()


def _documented(name: str) -> bool:
    return re.search(rf"`{re.escape(name)}[`( ]", REFERENCE) is not None


def _command_names() -> list[str]:
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    names += [g.name for g in app.registered_groups]
    return names


def test_every_command_is_documented():
    names = _command_names()
    assert {"demo", "mock", "build", "info", "sql"} <= set(names)
    missing = [n for n in names if not _documented(f"ard {n}")]
    assert not missing, f"commands not in docs/reference.md: {missing}"


def test_every_view_macro_and_function_is_documented(core_ard):
    with ard_sql.open(core_ard) as db:
        views = [r[0] for r in db.sql("SELECT table_name FROM information_schema.tables").fetchall()]
        macros = [r[0] for r in db.sql("SELECT DISTINCT function_name FROM duckdb_functions() WHERE NOT internal").fetchall()]
        udfs = sorted(db._pass_functions)
    assert {"ard", "core", "ard_meta", "post_starbursts"} <= set(views)
    assert {"cone", "similar", "similar_to"} <= set(macros)
    assert "spectrum" in udfs
    missing = [n for n in views + macros + udfs if not _documented(n)]
    assert not missing, f"not in docs/reference.md: {missing}"


def test_every_flag_bit_is_documented_with_its_value():
    """docs/reference.md's "Flag bits" tables name every bit of every layer's flag column, at its value."""
    from ard_sql.build.layers import topology
    from ard_sql.science import kinematics, lick, pipes_fit

    text = (Path(__file__).parents[1] / "docs" / "reference.md").read_text()
    section = text.split("## Flag bits", 1)[1].split("\n## ", 1)[0]
    for name, bit in [*kinematics.FLAGS.items(), *pipes_fit.FLAGS.items(), *topology.FLAGS.items()]:
        if not name.startswith("LINE_"):
            assert f"| {bit} | `{name}` |" in section, (name, bit)
    assert "`LINE_<line>`" in section and all(f"<index>_{r}" in section for r in lick._REASONS)
    assert all(kinematics.FLAGS[f"LINE_{nm}"] == 1 << (16 + j) for j, nm in enumerate(kinematics.LINE_NAMES))
