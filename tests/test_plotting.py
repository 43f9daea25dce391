"""Plots: a spectrum with its models, the quenching diagram, BPT and the sky map; `ard plot`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import ard_sql
from ard_sql.build.options import BuildOptions
from ard_sql.build.orchestrator import build
from ard_sql.cli import app


@pytest.fixture(scope="module")
def lick_ard(tmp_path_factory):
    from conftest import write_small_survey

    root = tmp_path_factory.mktemp("plots")
    write_small_survey(root / "survey")
    build(BuildOptions(source=str(root / "survey"), out=str(root / "ard"), layers=["lick"], scheduler="sync", progress=False))
    return root / "ard"


def test_every_plot_writes_an_image(lick_ard, tmp_path):
    with ard_sql.open(lick_ard) as db:
        ids = db.sql("SELECT TargetID FROM ard ORDER BY TargetID LIMIT 2").df().TargetID
        fig = ard_sql.plot_spectrum(ids, show_model=True, db=db, out=tmp_path / "spec.png")
        assert len(fig.axes) >= 2 and "TargetID" in fig.axes[0].get_title()
        for name, fn in (("q", ard_sql.plot_quenching_diagram), ("bpt", ard_sql.plot_bpt), ("sky", ard_sql.plot_sky)):
            fn(db=db, out=tmp_path / f"{name}.png")
        with pytest.raises(ValueError, match="not in the ARD"):
            ard_sql.plot_spectrum(12345, db=db)
    for name in ("spec", "q", "bpt", "sky"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_default_db_is_closed_and_the_core_table_read_once(lick_ard, tmp_path, monkeypatch):
    """db=None opens $ARD_HOME and closes it; plot_spectrum locates every model with one core scan."""
    import duckdb

    from ard_sql.udfs.spectrum import TargetLocator

    monkeypatch.setenv("ARD_HOME", str(lick_ard))
    opened = []
    real_open = ard_sql.open

    def recording_open(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    scans = []
    real_from_core = TargetLocator.from_core.__func__

    def counting_from_core(cls, ard_dir):
        scans.append(ard_dir)
        return real_from_core(cls, ard_dir)

    monkeypatch.setattr(ard_sql, "open", recording_open)
    monkeypatch.setattr(TargetLocator, "from_core", classmethod(counting_from_core))
    with real_open(lick_ard) as db:
        ids = db.sql("SELECT TargetID FROM ard ORDER BY TargetID LIMIT 3").df().TargetID
    ard_sql.plot_spectrum(ids, show_model=True, out=tmp_path / "spec.png")
    ard_sql.plot_sky(out=tmp_path / "sky.png")
    assert len(opened) == 2
    assert len(scans) == 2  # one for the spectrum() UDF, one for the 3 targets x 3 model components
    for db in opened:
        with pytest.raises(duckdb.ConnectionException):
            db.con.execute("SELECT 1")


def test_ard_plot_command(lick_ard, tmp_path):
    with ard_sql.open(lick_ard) as db:
        tid = db.sql("SELECT min(TargetID) FROM ard").fetchall()[0][0]
    out = tmp_path / "s.png"
    res = CliRunner().invoke(app, ["plot", str(lick_ard), "spectrum", "--target", str(tid), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(app, ["plot", str(lick_ard), "histogram"])
    assert res.exit_code == 2 and "unknown plot" in res.output
    res = CliRunner().invoke(app, ["plot", str(lick_ard), "spectrum"])
    assert res.exit_code == 2 and "--target" in res.output
    res = CliRunner().invoke(app, ["plot", str(lick_ard), "spectrum", "--target", str(tid), "--where", "Z < 1"])
    assert res.exit_code == 2 and "--where" in res.output


def test_where_filters_every_sample_plot(lick_ard, tmp_path):
    """--where / where= selects the galaxies of the quenching, BPT and sky plots (it used to be ignored by two)."""
    with ard_sql.open(lick_ard) as db:
        z = db.sql("SELECT median(Z) FROM ard").fetchall()[0][0]
        n_all = len(ard_sql.plot_sky(db=db).axes[0].collections[0].get_offsets()) + sum(
            len(c.get_offsets()) for c in ard_sql.plot_sky(db=db).axes[0].collections[1:])
        fig = ard_sql.plot_sky(db=db, where=f"Z < {z}")
        n_cut = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
        assert 0 < n_cut < n_all
    for kind in ("bpt", "sky", "quenching"):
        res = CliRunner().invoke(app, ["plot", str(lick_ard), kind, "--where", "nope > 1", "--out", str(tmp_path / "x.png")])
        assert res.exit_code == 2 and "nope" in res.output, (kind, res.output)
