"""The ``ard`` command line (issue 2): build, info, sql; exit codes on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from typer.testing import CliRunner

from ard_sql.cli import app

from conftest import PairSpec, arm_wave, write_pair, write_small_survey

runner = CliRunner()
FAST = ["--layers", "core", "--scheduler", "sync", "--no-progress"]


def ard(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(text: str) -> str:
    """Output with rich's line wrapping undone (words joined by single spaces)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def cli_ard(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    root = base / "survey"
    truth = write_small_survey(root)
    out = base / "ard"
    res = ard("build", root, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    return root, truth, out, res


def test_help_of_every_command():
    """Every command's --help fits an 80-column terminal without cutting a name or a sentence."""
    import typer.main

    group = typer.main.get_command(app)
    commands = [[]] + [[name] for name in group.commands]
    commands += [["daemon", name] for name in group.commands["daemon"].commands]
    assert len(commands) >= 12
    for cmd in commands:
        res = runner.invoke(app, [*cmd, "--help"], catch_exceptions=False, terminal_width=80, env={"COLUMNS": "80"})
        assert res.exit_code == 0, res.output
        assert "Usage" in res.output
        assert "…" not in res.output, (cmd, res.output)  # rich cuts names and words
        listed = res.output.partition("Commands:")[2].splitlines()
        assert not any(line.rstrip().endswith("...") for line in listed), (cmd, res.output)  # click cuts short help
        assert max(len(line) for line in res.output.splitlines()) <= 80, (cmd, res.output)
    assert "--keep-going" in ard("build", "--help").output and "--scheduler" in ard("build", "--help").output
    assert "--format" in ard("sql", "--help").output


def test_ard_functions_lists_every_function_and_where_it_works(cli_ard):
    """A plain DuckDB client can look up what it is missing: every UDF and TEMP macro that ard_sql.open()
    registers is listed as Python-only, every macro stored in ard.duckdb as working anywhere."""
    import duckdb

    import ard_sql
    from ard_sql.udfs import EVERYWHERE, PYTHON_ONLY

    _, _, out, _ = cli_ard
    plain = duckdb.connect(str(out / "ard.duckdb"), read_only=True)
    rows = plain.sql("SELECT name, available_in FROM ard_functions").fetchall()
    stored = {r[0] for r in plain.sql("SELECT function_name FROM duckdb_functions() WHERE NOT internal "
                                      "AND database_name = current_database()").fetchall()}
    plain.close()
    listed = {where: {name for name, w in rows if w == where} for where in (EVERYWHERE, PYTHON_ONLY)}
    assert stored and stored == listed[EVERYWHERE]
    with ard_sql.open(out) as db:
        temp = {r[0] for r in db.sql("SELECT function_name FROM duckdb_functions() WHERE database_name = 'temp'").fetchall()}
        registered = set(db._instance_functions) | temp
    assert registered and registered <= listed[PYTHON_ONLY]
    assert {"spectrum", "lick", "cone_search"} <= listed[PYTHON_ONLY]


def test_build_info_sql(cli_ard):
    _, truth, out, res = cli_ard
    assert "(0 errors" in flat(res.output)
    assert (out / "ard.duckdb").is_file() and (out / "build-report.json").is_file()
    n = len(truth["targets"])
    info = ard("info", out)
    assert info.exit_code == 0, info.output
    assert "core" in info.output and str(n) in info.output
    csv = ard("sql", out, "SELECT count(*) AS n, count(DISTINCT HEALPIX) AS p FROM ard", "--format", "csv")
    assert csv.exit_code == 0, csv.output
    assert csv.stdout.strip().splitlines()[-1] == f"{n},4"
    js = ard("sql", out, "SELECT TargetID, N_SPECTRA FROM ard WHERE N_SPECTRA > 1", "--format", "json")
    assert js.exit_code == 0, js.output
    rows = [json.loads(line) for line in js.stdout.strip().splitlines()]
    assert rows == [{"TargetID": truth["duplicate"], "N_SPECTRA": 2}]
    table = ard("sql", out, "SELECT count(*) AS how_many FROM ard WHERE Web_Class = 'Void'")
    assert table.exit_code == 0 and "how_many" in table.stdout
    spec = ard("sql", out, f"SELECT len(spectrum({truth['duplicate']}).flux) AS npix", "--format", "csv")
    assert spec.exit_code == 0 and spec.stdout.strip().splitlines()[-1] == "7781"


def test_sql_errors_and_missing_ard(cli_ard, tmp_path):
    _, _, out, _ = cli_ard
    bad = ard("sql", out, "SELECT nope FROM ard")
    assert bad.exit_code != 0 and "query failed" in flat(bad.output)
    assert ard("sql", out, "SELECT 1", "--format", "xml").exit_code != 0
    missing = ard("info", tmp_path / "none")
    assert missing.exit_code != 0 and "ard build" in flat(missing.output)
    root, _, _, _ = cli_ard
    survey = ard("info", root)  # the source folder given where the ARD was meant
    assert survey.exit_code != 0 and "holds DESI coadd files, not an ARD" in flat(survey.output)


def test_sql_prints_nested_and_wide_results(cli_ard):
    """CSV has no nested type: vectors and structs come out as JSON text; a result too wide for the
    terminal prints one name / value table per row instead of a grid of empty columns."""
    _, truth, out, _ = cli_ard
    csv = ard("sql", out, "SELECT TargetID, [1.5, 2.0]::FLOAT[2] AS v, {'a': 1} AS s, emb_astro FROM ard LIMIT 1",
              "--format", "csv")
    assert csv.exit_code == 0, csv.output
    header, row = csv.stdout.strip().splitlines()[-2:]
    assert header == '"TargetID","v","s","emb_astro"'
    assert row.split(",", 1)[1] == '"[1.5, 2.0]","{""a"": 1}",'
    wide = runner.invoke(app, ["sql", str(out), "SELECT * FROM ard LIMIT 2"], catch_exceptions=False,
                         terminal_width=100, env={"COLUMNS": "100"})
    assert wide.exit_code == 0, wide.output
    assert "row 1" in wide.stdout and "row 2" in wide.stdout and "SNR_Median" in wide.stdout


def test_a_targetid_in_two_files_of_one_program_is_named(tmp_path):
    """DESI has one spectrum per target per survey and program, at one position: a repeat in another file of
    the same program, 1 deg away, is two objects under one ID (or a copied file) and is reported with both files."""
    root = tmp_path / "survey"
    truth = write_small_survey(root)
    tid = min(truth["targets"])
    other, _ = write_pair(root, "main", "dark", 30000, PairSpec(np.array([tid])))
    res = ard("build", root, "--out", tmp_path / "ard", *FAST)
    assert res.exit_code == 1, res.output
    problems = json.loads((tmp_path / "ard" / "build-report.json").read_text())["problems"]
    named = [p for p in problems if p["target"] == tid]
    assert len(named) == 1 and "twice in survey main, program dark" in named[0]["reason"]
    assert "deg apart" in named[0]["reason"] and {named[0]["file"], named[0]["reason"].split()[3].rstrip(":")} == {
        str(other), str(root / "healpix/main/dark/1/100/coadd-main-dark-100.fits")}
    assert len(problems) == 1  # the legitimate repeat (same target in the bright program, same place) is not one


def test_build_refuses_before_starting_anything(tmp_path):
    """A bad scheduler or a layers-only run on a folder with no core: exit 2, a clear message, no folder made."""
    bad = ard("build", "--out", tmp_path / "a", "--scheduler", "foo")
    assert bad.exit_code == 2 and "dask scheduler address" in flat(bad.output)
    assert not (tmp_path / "a").exists()
    nocore = ard("build", "--out", tmp_path / "b", "--layers", "lick", "--scheduler", "sync")
    assert nocore.exit_code == 2 and "no core table yet" in flat(nocore.output)
    assert not (tmp_path / "b").exists()


def test_rerun_skips_unchanged(cli_ard):
    root, _, out, first = cli_ard
    res = ard("build", root, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    assert "'built': 0," in flat(res.output) and "'skipped_unchanged': 3" in flat(res.output)


def _survey_with(tmp_path: Path, bad: str) -> tuple[Path, Path]:
    root = tmp_path / "survey"
    write_small_survey(root)
    drop = {"missing_hdu": ("B_IVAR",), "missing_flux": ("B_FLUX",)}.get(bad, ())
    ivar = {"B": np.full((3, len(arm_wave("B")) - 10), 4.0, np.float32)} if bad == "ivar_width" else {}
    coadd, rr = write_pair(root, "main", "dark", 30000, PairSpec(39627640566900000 + np.arange(3),
                                                                  drop_hdus=drop, arm_ivar=ivar))
    if bad in ("nan_flux", "duplicate_row"):
        coadd.unlink()
        rr.unlink()
        tid = 39627640566900000 + np.array([0, 1, 1]) if bad == "duplicate_row" else 39627640566900000 + np.arange(3)
        flux = np.full((3, len(arm_wave("B"))), 2.0, np.float32)
        if bad == "nan_flux":
            flux[1, 100:110] = np.nan
        coadd, rr = write_pair(root, "main", "dark", 30000, PairSpec(tid, arm_flux={"B": flux}))
        return root, coadd
    if bad == "bad_z":
        coadd.unlink()
        rr.unlink()
        coadd, rr = write_pair(root, "main", "dark", 30000, PairSpec(39627640566900000 + np.arange(3),
                                                                      z=np.array([0.1, np.nan, -5.0])))
        return root, rr
    if bad == "truncated":
        coadd.write_bytes(coadd.read_bytes()[:50000])
        return root, coadd
    if bad == "orphan":
        coadd.unlink()
        return root, rr
    return root, coadd


@pytest.mark.parametrize("bad, n_rows", [("truncated", 24), ("missing_hdu", 24), ("missing_flux", 24), ("ivar_width", 24), ("bad_z", 27),
                                         ("orphan", 24),
                                         ("nan_flux", 27), ("duplicate_row", 26)])
def test_bad_input_exit_code_and_keep_going(tmp_path, bad, n_rows):
    """Skipped files and repaired rows (kept) alike give exit 1 unless --keep-going."""
    root, bad_file = _survey_with(tmp_path, bad)
    out = tmp_path / "ard"
    res = ard("build", root, "--out", out, *FAST)
    assert res.exit_code == 1, res.output
    assert bad_file.name in "".join(res.output.split())
    report = json.loads((out / "build-report.json").read_text())
    assert any(p.get("file") == str(bad_file) for p in report["problems"])
    if bad in ("missing_hdu", "missing_flux", "ivar_width"):  # the file's FIBERMAP still reads: its targets are named
        reason = next(p["reason"] for p in report["problems"] if p.get("file") == str(bad_file))
        assert "none of the 3 target(s) it lists" in reason and "39627640566900002" in reason
    # The rest was built and opens.
    q = ard("sql", out, "SELECT count(*) FROM ard", "--format", "csv")
    assert q.stdout.strip().splitlines()[-1] == str(n_rows)
    res = ard("build", root, "--out", out, *FAST, "--keep-going")
    assert res.exit_code == 0, res.output


def test_zcat_option(cli_ard, tmp_path):
    root, truth, _, _ = cli_ard
    dup = truth["duplicate"]
    t = Table({"TARGETID": np.array([dup, dup], np.int64), "SURVEY": ["main", "main"], "PROGRAM": ["dark", "bright"],
               "ZCAT_PRIMARY": np.array([False, True])})
    zcat = tmp_path / "zpix.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(t, name="ZCATALOG")]).writeto(zcat)
    out = tmp_path / "ard"
    res = ard("build", root, "--out", out, *FAST, "--zcat", zcat)
    assert res.exit_code == 0, res.output
    q = ard("sql", out, f"SELECT PROGRAM FROM ard WHERE TargetID = {dup}", "--format", "csv")
    assert q.stdout.strip().splitlines()[-1].strip('"') == "bright"


def test_build_errors_exit_cleanly(tmp_path):
    res = ard("build", tmp_path / "no_such_folder", "--out", tmp_path / "ard", *FAST)
    assert res.exit_code == 2 and "does not exist" in flat(res.output)
    (tmp_path / "empty").mkdir()
    res = ard("build", tmp_path / "empty", "--out", tmp_path / "ard", *FAST)
    assert res.exit_code == 2 and "no coadd/redrock" in flat(res.output)
    res = ard("build", tmp_path / "empty", "--out", tmp_path / "ard", "--layers", "nosuchlayer")
    assert res.exit_code == 2 and "unknown layer" in flat(res.output)


def test_layer_shortcut_options_reach_the_build(monkeypatch, tmp_path):
    """``--ppxf-mode`` and ``--astroclip-checkpoint`` are the issue's spellings of two layer options."""
    import ard_sql.build.orchestrator as orchestrator

    seen = {}

    def capture(opts):
        seen.update(opts.layer_options)
        raise orchestrator.BuildFailed("captured")

    monkeypatch.setattr(orchestrator, "build", capture)
    ckpt = tmp_path / "astroclip.ckpt"
    ckpt.write_bytes(b"x")
    res = ard("build", "--out", tmp_path / "a", "--ppxf-mode", "reference", "--astroclip-checkpoint", ckpt)
    assert res.exit_code != 0 and "captured" in res.output
    assert seen == {"ppxf": {"mode": "reference"}, "embed": {"astroclip_checkpoint": str(ckpt.resolve())}}


def test_layer_shortcut_options_reject_bad_values(tmp_path):
    res = ard("build", "--out", tmp_path / "a", "--ppxf-mode", "quick")
    assert res.exit_code != 0 and "--ppxf-mode must be 'fast' or 'reference'" in flat(res.output)
    assert not (tmp_path / "a").exists()
    res = ard("build", "--out", tmp_path / "a", "--astroclip-checkpoint", tmp_path / "none.ckpt")
    assert res.exit_code != 0 and "no such file" in flat(res.output) and "none.ckpt" in flat(res.output)


def test_demo_reuses_a_mock_only_with_every_setting_equal(monkeypatch, tmp_path):
    """`ard demo --area 100` must not reuse a 30 deg^2 mock that has the same n and seed."""
    from ard_sql.build.mock import survey as mock_survey
    from ard_sql.commands import demo as demo_cmd

    runs = []

    def fake_run_mock(cfg, progress=None):  # writes what run_mock records, without the minutes of work
        runs.append(cfg.settings())
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / f"stale-{len(runs)}.fits").write_text("x")
        (Path(cfg.out) / "mock.json").write_text(json.dumps({**cfg.settings(), "partitions": 1}))
        return cfg.settings()

    monkeypatch.setattr(mock_survey, "run_mock", fake_run_mock)
    survey = tmp_path / "survey"
    demo_cmd._mock(survey, n=100, seed=0, area=30.0, zmax=0.4, progress=False)
    demo_cmd._mock(survey, n=100, seed=0, area=30.0, zmax=0.4, progress=False)
    assert len(runs) == 1  # same settings: reused
    demo_cmd._mock(survey, n=100, seed=0, area=100.0, zmax=0.4, progress=False)
    assert len(runs) == 2 and runs[-1]["area_deg2"] == 100.0
    assert not (survey / "stale-1.fits").exists()  # the old mock's files cannot leak into the new one
    demo_cmd._mock(survey, n=100, seed=0, area=100.0, zmax=0.3, progress=False)
    assert len(runs) == 3 and runs[-1]["zmax"] == 0.3
    # a mock.json written before the settings were all recorded (n and seed only) is regenerated
    (survey / "mock.json").write_text(json.dumps({"n": 100, "seed": 0}))
    demo_cmd._mock(survey, n=100, seed=0, area=100.0, zmax=0.3, progress=False)
    assert len(runs) == 4


def test_mock_json_records_every_setting(tmp_path):
    from ard_sql.build.mock.survey import MockConfig

    cfg = MockConfig(out=tmp_path, n=500, seed=2, zmax=0.3, physics="prior")
    s = cfg.settings()
    assert s == {"n": 500, "seed": 2, "area_deg2": 20.0, "zmax": 0.3, "truth_spectra": True, "resolution": True,
                 "max_cells": 2**22, "physics": "prior"}
    assert json.loads(json.dumps(s)) == s  # survives the round trip through mock.json


@pytest.mark.parametrize("assignment, says", [
    ("bagpipes.xyz=1", "bagpipes layer: unknown option(s) ['xyz']"),
    ("topology.smoothing=abc", "option smoothing='abc': must be a number > 0"),
    ("lick.max_bad_frac=-1", "option max_bad_frac=-1: must be a number between 0 and 1"),
    ("topology.nosuch=1", "cosmology"),
])
def test_set_is_checked_before_any_work_for_every_layer(cli_ard, tmp_path, assignment, says):
    """``--layers core --set ...``: options of layers not run are checked too; exit 2 and nothing written."""
    root, _, _, _ = cli_ard
    out = tmp_path / "ard"
    res = ard("build", root, "--out", out, *FAST, "--set", assignment)
    assert res.exit_code == 2, res.output
    assert says in flat(res.output)
    assert not out.exists()


def test_info_names_a_truncated_staging_file(cli_ard, tmp_path):
    """A truncated partition file: a clear error naming it and how to rebuild, not a traceback."""
    _, _, built, _ = cli_ard
    out = tmp_path / "ard"
    shutil.copytree(built, out)
    part = sorted((out / "staging/core/dataset").rglob("Npix=*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    res = ard("info", out)
    assert res.exit_code == 2, res.output
    text = "".join(res.output.split())
    assert "".join(str(part).split()) in text and "damagedortruncated" in text and "ardbuild" in text
    assert "Traceback" not in res.output
