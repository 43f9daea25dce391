"""db.query: filter syntax, validation messages, outputs and streaming (issue 9/10)."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ard_sql import paths, regions
from ard_sql.query import QueryError, build_sql, filter_to_sql, run_query

ORDER = 3


def make_toy_ard(root, n: int = 20_000, seed: int = 1) -> duckdb.DuckDBPyConnection:
    """A small HATS-layout core table and an `ard` view exposing Npix from the file name."""
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    h29 = regions.healpix29(ra, dec)
    npix = h29 >> (2 * (29 - ORDER))
    web = rng.integers(0, 4, n)
    table = pa.table(
        {
            "TargetID": np.arange(n, dtype=np.int64),
            "RA": ra,
            "DEC": dec,
            "Z": rng.uniform(0.01, 0.5, n),
            "LogMass_p50": rng.normal(10.3, 0.6, n),
            "SNR_Median": rng.uniform(0, 30, n).astype(np.float32),
            "Web_Class": np.array(["Void", "Sheet", "Filament", "Knot"])[web],
            "Web_Class_Code": web.astype(np.int8),
            "_healpix_29": h29,
        }
    )
    for p in np.unique(npix):
        f = paths.partition_file(root, ORDER, int(p))
        f.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pa.array(npix == p)), f)
    con = duckdb.connect()
    glob = (paths.staging_dir(root) / "dataset").as_posix() + "/**/*.parquet"
    con.execute(
        f"CREATE VIEW ard AS SELECT * EXCLUDE (filename), "
        f"regexp_extract(filename, 'Npix=(\\d+)', 1)::INTEGER AS Npix, "
        f"regexp_extract(filename, 'Norder=(\\d+)', 1)::TINYINT AS Norder "
        f"FROM read_parquet('{glob}', filename=true)"
    )
    return con, table


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ard")
    con, table = make_toy_ard(root)
    return root, con, table


def test_blueprint_filter_translates_with_pandas_precedence():
    sql = filter_to_sql("LogMass_p50 > 11.0 & Web_Class == 'Void' & SNR_Median > 10")
    assert sql == "LogMass_p50 > 11.0 AND Web_Class = 'Void' AND SNR_Median > 10"
    assert filter_to_sql("Z < 0.1 | Z > 0.4 & ~(SNR_Median < 5)") == "Z < 0.1 OR Z > 0.4 AND NOT (SNR_Median < 5)"
    assert filter_to_sql("Web_Class == 0") == "Web_Class_Code = 0"


@pytest.mark.parametrize(
    "bad, words",
    [
        ("Z > 1; DROP VIEW ard", ["';'", "^"]),
        ("TargetID IN (SELECT 1)", ["SELECT", "not allowed"]),
        ("LogMas_p50 > 11", ["unknown column 'LogMas_p50'", "did you mean LogMass_p50"]),
        ("read_csv('x') IS NULL", ["function 'read_csv' is not allowed"]),
        ("t.Z > 1", ["qualified column"]),
        ("Z > (1", ["cannot parse"]),
        ("", ["empty"]),
    ],
)
def test_rejections_say_what_and_where(bad, words):
    with pytest.raises(QueryError) as err:
        filter_to_sql(bad)
    for w in words:
        assert w in str(err.value)


def test_unknown_output_column_rejected():
    with pytest.raises(QueryError, match="did you mean Dist_Filament"):
        build_sql("Z > 0", ["Dist_Filamnt"])


def test_results_match_numpy(toy):
    _, con, table = toy
    df = run_query(con, "LogMass_p50 > 10.5 & Web_Class == 'Void' & SNR_Median > 10", ["TargetID", "LogMass_p50"])
    t = table.to_pandas()
    want = t[(t.LogMass_p50 > 10.5) & (t.Web_Class == "Void") & (t.SNR_Median > 10)]
    assert sorted(df.TargetID) == sorted(want.TargetID)
    assert list(df.columns) == ["TargetID", "LogMass_p50"]


def test_outputs_arrow_astropy_and_batches(toy):
    _, con, _ = toy
    arrow = run_query(con, "Z < 0.2", ["TargetID", "RA", "Z"], output="arrow")
    assert isinstance(arrow, pa.Table) and arrow.num_rows > 0
    tab = run_query(con, "Z < 0.2", ["TargetID", "RA", "Z"], output="astropy")
    assert str(tab["RA"].unit) == "deg" and len(tab) == arrow.num_rows
    reader = run_query(con, "Z < 0.2", ["TargetID"], output="batches", batch_size=1000)
    sizes = [b.num_rows for b in reader]
    assert sum(sizes) == arrow.num_rows and max(sizes) <= 2048 and len(sizes) > 1
    with pytest.raises(QueryError, match="output="):
        run_query(con, "Z < 0.2", output="csv")


def test_region_in_query_is_exact_and_pruned(toy):
    root, con, table = toy
    ra0, dec0, r = 150.0, 2.0, 6.0
    got = run_query(con, f"cone({ra0}, {dec0}, {r}) & Z < 0.3", ["TargetID"], ard_dir=root)
    t = table.to_pandas()
    sep = regions.angular_separation_deg(t.RA, t.DEC, ra0, dec0)
    want = t[(sep <= r) & (t.Z < 0.3)]
    assert len(want) > 10 and sorted(got.TargetID) == sorted(want.TargetID)
    sql = build_sql(f"cone({ra0}, {dec0}, {r})", ["TargetID"], orders=[ORDER])
    plan = con.execute("EXPLAIN ANALYZE " + sql).fetchall()[0][1]
    n_files = len(list((paths.staging_dir(root) / "dataset").rglob("*.parquet")))
    scanned = [line for line in plan.splitlines() if "Scanning Files" in line]
    assert scanned, plan
    k = int(scanned[0].split(":")[1].split("/")[0])
    assert k < n_files / 20, scanned
