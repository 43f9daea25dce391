"""Storage (issue 2): the HATS catalog, the HDF5 spectra store, ``ard.duckdb`` and ``ard_sql.open()``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

import ard_sql
from ard_sql import grid, paths
from ard_sql.build.options import BuildOptions
from ard_sql.build.orchestrator import build
from ard_sql.connection import ARDNotFound

from conftest import write_small_survey


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(survey root, truth, ARD folder): the small survey ingested once for this module."""
    base = tmp_path_factory.mktemp("storage")
    root = base / "survey"
    truth = write_small_survey(root)
    out = base / "ard"
    report = build(BuildOptions(source=str(root), out=str(out), layers=[], scheduler="sync", progress=False))
    assert not report.errors, report.errors
    return root, truth, out


def _core_ids(ard: Path) -> list[int]:
    with ard_sql.open(ard) as db:
        return [r[0] for r in db.sql("SELECT TargetID FROM core ORDER BY 1").fetchall()]


# ------------------------------------------------------------------ HATS
def test_hats_files_are_there(built):
    _, truth, out = built
    cat = paths.staging_dir(out, "core")
    for name in ("hats.properties", "properties", "partition_info.csv", "dataset/_metadata", "dataset/_common_metadata"):
        assert (cat / name).is_file(), name
    props = dict(line.split("=", 1) for line in (cat / "hats.properties").read_text().splitlines() if "=" in line)
    assert props["dataproduct_type"] == "object" and int(props["hats_nrows"]) == len(truth["targets"])
    info = (cat / "partition_info.csv").read_text().splitlines()
    assert info[0] == "Norder,Npix"
    files = sorted((cat / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"))
    assert len(files) == len(info) - 1 >= 2
    meta = pq.read_metadata(cat / "dataset/_metadata")
    assert meta.num_rows == len(truth["targets"])
    schema = pq.read_schema(cat / "dataset/_common_metadata")
    assert "_healpix_29" in schema.names and "TargetID" in schema.names
    for f in files:
        t = pq.read_table(f, columns=["_healpix_29", "HEALPIX"])
        h29 = t.column("_healpix_29").to_numpy()
        assert np.all(np.diff(h29) >= 0)  # sorted by the spatial index
        order, npix = int(f.parent.parent.name.split("=")[1]), int(f.stem.split("=")[1])
        assert np.all(h29 >> (2 * (29 - order)) == npix)  # each row lies in its partition
        assert np.all(t.column("HEALPIX").to_numpy() >> (2 * (6 - order)) == npix)


def test_lsdb_opens_the_core_catalog(built):
    lsdb = pytest.importorskip("lsdb")
    _, truth, out = built
    cat = lsdb.open_catalog(paths.staging_dir(out, "core"))
    df = cat.compute()
    assert len(df) == len(truth["targets"])
    assert sorted(df["TargetID"].astype(np.int64).tolist()) == _core_ids(out)
    assert cat.hc_structure.catalog_info.total_rows == len(truth["targets"])
    # A cone around pixel 20000 finds exactly its targets.
    import healpy as hp

    ra, dec = hp.pix2ang(64, 20000, nest=True, lonlat=True)
    cone = cat.cone_search(ra, dec, 0.2 * 3600).compute()
    expected = sorted(t for t, v in truth["targets"].items() if v["pixel"] == 20000)
    assert sorted(cone["TargetID"].tolist()) == expected


# ------------------------------------------------------------------ the spectra store
def test_spectra_file_layout(built):
    _, truth, out = built
    files = sorted((out / "spectra").glob("Norder=*/Dir=*/Npix=*.h5"))
    assert files
    total = 0
    for f in files:
        with h5py.File(f, "r") as h5:
            n = len(h5["targetid"])
            total += n
            assert h5["flux"].shape == (n, grid.NPIX) and h5["flux"].dtype == np.float32
            assert h5["flux"].chunks == (1, grid.NPIX)  # one object per chunk
            assert h5["flux"].compression == "gzip" and h5["ivar"].compression == "gzip"
            assert h5["mask"].dtype == np.uint32
            np.testing.assert_allclose(h5["wavelength"][...], grid.brz_wavelength())
    assert total == len(truth["targets"])


def test_spectrum_returns_the_stored_flux(built):
    root, truth, out = built
    with ard_sql.open(out) as db:
        rows = db.sql("SELECT TargetID, SPEC_FILE, SPEC_ROW, spectrum(TargetID) AS s FROM ard ORDER BY TargetID").fetchall()
        assert len(rows) == len(truth["targets"])
        for tid, spec_file, spec_row, s in rows:
            with h5py.File(out / spec_file, "r") as h5:
                assert h5["targetid"][spec_row] == tid
                np.testing.assert_array_equal(np.asarray(s["flux"], np.float32), h5["flux"][spec_row])
                np.testing.assert_array_equal(np.asarray(s["ivar"], np.float32), h5["ivar"][spec_row])
                np.testing.assert_array_equal(np.asarray(s["mask"], np.uint32), h5["mask"][spec_row])
        # Against the coadd itself: in the B-only range the stored flux is the B arm's.
        tid = min(t for t, v in truth["targets"].items() if v["pixel"] == 20000)
        coadd = root / "healpix/main/dark/200/20000/coadd-main-dark-20000.fits"
        with fits.open(coadd) as h:
            i = int(np.flatnonzero(h["FIBERMAP"].data["TARGETID"] == tid)[0])
            bflux = h["B_FLUX"].data[i]
        s = db.sql("SELECT spectrum(?::BIGINT) AS s", params=[tid]).fetchall()[0][0]
        nb = grid.arm_slice("R").start
        np.testing.assert_allclose(np.asarray(s["flux"])[:nb], bflux[:nb], rtol=1e-6)
        # Unknown and NULL ids give NULL; the struct has the brz wavelength grid.
        unknown = db.sql("SELECT spectrum(12345::BIGINT), spectrum(NULL::BIGINT)").fetchall()[0]
        assert unknown == (None, None)
        mixed = db.sql("SELECT spectrum(t) IS NULL FROM (SELECT unnest([?::BIGINT, 1, NULL]) AS t)", params=[tid]).fetchall()
        assert [m[0] for m in mixed] == [False, True, True]
        wave = db.sql("SELECT spectrum(?::BIGINT).wavelength", params=[tid]).fetchall()[0][0]
        assert len(wave) == grid.NPIX and wave[0] == pytest.approx(3600.0) and wave[-1] == pytest.approx(9824.0)


# ------------------------------------------------------------------ ard.duckdb and open()
def test_views_types_and_meta(built):
    _, truth, out = built
    with ard_sql.open(out) as db:
        assert db.sql("SELECT count(*) FROM ard").fetchall()[0][0] == len(truth["targets"])
        assert db.sql("SELECT count(*) FROM ard WHERE Web_Class = 'Void'").fetchall()[0][0] == 0  # not run: NULL
        assert db.sql("SELECT count(*) FROM ard WHERE Web_Class IS NULL").fetchall()[0][0] == len(truth["targets"])
        types = dict(db.sql("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'ard'").fetchall())
        assert "Void" in types["Web_Class"] or types["Web_Class"].upper() == "WEB_CLASS"
        assert db.sql("SELECT 'Void'::WEB_CLASS < 'Knot'::WEB_CLASS").fetchall()[0][0] is True
        assert db.sql("SELECT count(*) FROM ard WHERE Web_Class = 0::UTINYINT::WEB_CLASS").fetchall()[0][0] == 0
        # Layers that have not run: typed NULL columns.
        assert db.sql("SELECT count(LogMass_p50), count(Dn4000) FROM ard").fetchall()[0] == (0, 0)
        assert types["LogMass_p50"] in ("FLOAT", "DOUBLE")
        meta = dict(((s, n), v) for s, n, v in db.sql("SELECT section, name, value FROM ard_meta").fetchall())
        assert ("version", "duckdb") in meta and ("build", "source") in meta
        assert db.sql("SELECT unit FROM ard_meta WHERE section = 'column' AND name = 'RA'").fetchall()
        # Only views in the database file: no data tables besides ard_meta and ard_functions (documentation).
        tables = db.sql("SELECT table_name FROM duckdb_tables() WHERE NOT temporary ORDER BY 1").fetchall()
        assert [t[0] for t in tables] == ["ard_functions", "ard_meta"]


def test_open_from_another_directory_and_by_file(built, tmp_path, monkeypatch):
    _, truth, out = built
    monkeypatch.chdir(tmp_path)
    for where in (out, out / "ard.duckdb", os.path.relpath(out, tmp_path)):
        with ard_sql.open(where) as db:
            assert db.sql("SELECT count(*) FROM ard").fetchall()[0][0] == len(truth["targets"])
            assert db.sql("SELECT count(*) FROM ard WHERE spectrum(TargetID) IS NOT NULL").fetchall()[0][0] == len(truth["targets"])


def test_open_after_moving_the_folder(built, tmp_path):
    _, truth, out = built
    first = tmp_path / "first"
    shutil.copytree(out, first)
    moved = tmp_path / "elsewhere" / "renamed_ard"
    moved.parent.mkdir()
    first.rename(moved)
    assert not first.exists()
    with ard_sql.open(moved) as db:
        assert db.sql("SELECT count(*) FROM ard").fetchall()[0][0] == len(truth["targets"])
        files = {Path(r[0]).resolve().parent.parent.parent for r in
                 db.sql("SELECT DISTINCT filename FROM read_parquet(getvariable('ard_dir') || '/staging/core/dataset/**/*.parquet', filename=true)").fetchall()}
        assert all(moved.resolve() in f.parents or f == moved.resolve() / "staging/core" for f in files)
        n = db.sql("SELECT count(spectrum(TargetID)) FROM ard").fetchall()[0][0]
        assert n == len(truth["targets"])


def test_plain_duckdb_without_ard_sql(built):
    """The plain duckdb package (no ard_sql import, no UDFs) opens the views from cwd=/."""
    _, truth, out = built
    code = textwrap.dedent(f"""
        import sys, duckdb
        con = duckdb.connect({str(out / 'ard.duckdb')!r}, read_only=True)
        n = con.execute("SELECT count(*) FROM ard").fetchall()[0][0]
        v = con.execute("SELECT count(*) FROM ard WHERE Web_Class = 'Void' OR Z > 0").fetchall()[0][0]
        assert not any(m.startswith('ard_sql') for m in sys.modules)
        print(n, v)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    n = len(truth["targets"])
    assert res.stdout.split() == [str(n), str(n)]


def test_two_read_only_processes_at_once(built, tmp_path):
    _, truth, out = built
    code = textwrap.dedent("""
        import sys, time, pathlib
        import ard_sql
        me, other = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
        db = ard_sql.open(sys.argv[1])
        n = db.sql("SELECT count(*) FROM ard").fetchall()[0][0]
        me.write_text("open")
        deadline = time.time() + 60
        while not other.exists():  # both connections are open at the same time
            if time.time() > deadline:
                sys.exit("the other process never opened the ARD")
            time.sleep(0.05)
        k = db.sql("SELECT count(spectrum(TargetID)) FROM ard").fetchall()[0][0]
        print(n, k)
        db.close()
    """)
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(x), str(y)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for x, y in ((a, b), (b, a))]
    n = len(truth["targets"])
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        assert stdout.split() == [str(n), str(n)]


def test_ard_home_default(built, tmp_path, monkeypatch):
    _, truth, out = built
    monkeypatch.setenv("ARD_HOME", str(out))
    with ard_sql.open() as db:
        assert db.path == out.resolve()
        assert db.sql("SELECT count(*) FROM ard").fetchall()[0][0] == len(truth["targets"])


def test_missing_ard_says_how_to_build_one(tmp_path, monkeypatch):
    empty = tmp_path / "nothing_here"
    monkeypatch.setenv("ARD_HOME", str(empty))
    with pytest.raises(ARDNotFound) as err:
        ard_sql.open()
    msg = str(err.value)
    assert str(empty) in msg and "ard build" in msg and "ARD_HOME" in msg
    # Without ARD_HOME: the per-user data folder.
    monkeypatch.delenv("ARD_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert paths.ard_home() == tmp_path / "xdg" / "ard_sql" / "ard"
    with pytest.raises(ARDNotFound, match="ard build"):
        ard_sql.open()
    with pytest.raises(ARDNotFound, match="ard mock"):
        ard_sql.open(tmp_path)


def test_read_only_connection_refuses_writes(built):
    _, _, out = built
    with ard_sql.open(out) as db:
        with pytest.raises(Exception):
            db.sql("CREATE TABLE x AS SELECT 1").fetchall()
        cur = db.cursor()  # cursors get the UDFs too
        assert cur.sql("SELECT count(spectrum(TargetID)) FROM core").fetchall()[0][0] > 0


def test_failed_prepare_closes_the_connection(built, monkeypatch):
    """ard_sql.open() that fails while registering the UDFs leaves no connection open."""
    import duckdb

    import ard_sql.udfs

    _, _, out = built
    opened: list[duckdb.DuckDBPyConnection] = []
    connect = duckdb.connect

    def recording_connect(*args, **kwargs):
        opened.append(connect(*args, **kwargs))
        return opened[-1]

    def broken_register_all(con, ard):
        raise RuntimeError("UDF registration failed")

    monkeypatch.setattr(duckdb, "connect", recording_connect)
    monkeypatch.setattr(ard_sql.udfs, "register_all", broken_register_all)
    with pytest.raises(RuntimeError, match="UDF registration failed"):
        ard_sql.open(out)
    assert len(opened) == 1
    with pytest.raises(duckdb.ConnectionException):
        opened[0].execute("SELECT 1")


def test_build_report_json(built):
    _, truth, out = built
    data = json.loads((out / "build-report.json").read_text())
    assert data["n_errors"] == 0
    assert data["layers"]["core"]["targets"] == len(truth["targets"])
    assert data["started"] <= data["finished"]


# ---------------------------------------------------------------- atomic writes (paths.atomic_path)
def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "file.json"
    target.parent.mkdir()
    target.write_text("old")
    with paths.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and ".tmp-" in tmp.name
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the body ends
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_atomic_path_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with paths.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_atomic_path_creates_the_folder_and_honours_suffix(tmp_path):
    target = tmp_path / "a" / "b" / "arrays.npz"
    with paths.atomic_path(target, suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz")
        np.savez(tmp, x=np.arange(3))
    with np.load(target) as blob:
        assert blob["x"].tolist() == [0, 1, 2]
    assert [p.name for p in target.parent.iterdir()] == ["arrays.npz"]


def test_temporary_siblings_are_unique(tmp_path):
    # a fixed name (".x.tmp") would let two concurrent writers of one file clobber each other's temporary
    names = {paths.temporary_sibling(tmp_path / "x.parquet") for _ in range(50)}
    assert len(names) == 50


def test_atomic_write_text_and_bytes(tmp_path):
    target = tmp_path / "out.json"
    assert paths.atomic_write_text(target, "{\"a\": 1}") == target
    assert json.loads(target.read_text()) == {"a": 1}
    paths.atomic_write_bytes(target, b"xyz", fsync=True)
    assert target.read_bytes() == b"xyz"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_model_write_leaves_no_temporary(tmp_path):
    from ard_sql import spectra_store

    with pytest.raises(ValueError, match="shape"):
        spectra_store.write_models(tmp_path, "ppxf", 5, 7, np.arange(2), {"stars": np.zeros((3, grid.NPIX))})
    folder = paths.model_file(tmp_path, "ppxf", 5, 7).parent
    assert not any(folder.iterdir())


def test_a_partition_of_an_older_schema_is_rewritten_in_todays(built, tmp_path, caplog):
    """A kept partition written by an earlier version (a column fewer, one since dropped) no longer breaks
    the catalog files: it is rewritten in today's schema, its rows and shared values kept."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ard_sql.build import hats_writer

    _, _, ard = built
    out = tmp_path / "ard"
    shutil.copytree(ard, out)
    (o, p, f), *_ = hats_writer.partition_files(out, paths.CORE)
    table = pq.read_table(f)
    old = table.drop_columns(["TSNR2_LYA"]).append_column("OLD_COLUMN", pa.array([1.0] * table.num_rows))
    pq.write_table(old, f)
    with caplog.at_level("WARNING"):
        n = hats_writer.finalize_catalog(out, paths.CORE)
    assert n == sum(pq.read_metadata(x).num_rows for _, _, x in hats_writer.partition_files(out, paths.CORE))
    assert "TSNR2_LYA: NULL (new)" in caplog.text and "OLD_COLUMN: dropped" in caplog.text and str(f) in caplog.text
    now = pq.read_table(f)
    assert now.schema.equals(hats_writer.stored_schema(paths.CORE))
    assert now.column("TSNR2_LYA").null_count == now.num_rows
    assert now.column("TargetID").equals(table.column("TargetID")) and now.column("Z").equals(table.column("Z"))
    assert hats_writer.upgrade_partition(out, paths.CORE, o, p) == []  # current now: nothing to do
    # a column that cannot be read in today's type: an error naming the file, the file left as it was
    pq.write_table(table.set_column(table.column_names.index("SPECTYPE"), "SPECTYPE",
                                    pa.array([[1.0]] * table.num_rows)), f)
    with pytest.raises(hats_writer.SchemaMismatch, match=f"{f}.*SPECTYPE"):
        hats_writer.finalize_catalog(out, paths.CORE)
    assert pq.read_schema(f).field("SPECTYPE").type == pa.list_(pa.float64())
