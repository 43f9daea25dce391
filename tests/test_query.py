"""db.query: filter syntax, validation messages, outputs and streaming (issue 9/10)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ard_sql import paths, regions
from ard_sql.query import QueryError, build_sql, filter_to_sql, reads_wide, run_query

ORDER = 3


def data_read_bytes(con, sql: str) -> float:
    """Bytes DuckDB reports reading ("Data Read" in EXPLAIN ANALYZE) for a query."""
    import re

    plan = con.execute("EXPLAIN ANALYZE " + sql).fetchall()[0][1]
    m = re.search(r"Data Read:\s*([\d.]+)\s*([kMG]?B)", plan)
    assert m, plan
    return float(m.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A catalog-only ARD (synth-catalog, every layer but embed) and its `ard` view as a DataFrame."""
    import ard_sql
    from ard_sql.build.synth_catalog import SynthOptions, synth_catalog

    root = tmp_path_factory.mktemp("ard")
    synth_catalog(root, SynthOptions(n=4000, order=ORDER, seed=1, layers=("lick", "ppxf", "bagpipes", "topology")))
    db = ard_sql.open(root)
    table = db.sql("SELECT TargetID, RA, DEC, Z, LogMass_p50, SNR_Median, CAST(Web_Class AS VARCHAR) AS Web_Class FROM ard").arrow().read_all()
    yield root, db.con, table
    db.close()


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
        # answers that would otherwise be silently wrong
        ("PPXF_flag & 8 == 0", ["joins an integer and a condition", "(PPXF_flag & 8) == 0"]),
        ("'void' == Web_Class", ["Web_Class is one of", "not 'void'", "did you mean 'Void'"]),
        ("Web_Class == 'void'", ["Web_Class is one of", "did you mean 'Void'"]),
        ("Web_Class in ('Void', 'Filaments')", ["not 'Filaments'"]),
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
    # a synthetic catalogue never passes for a fitted one
    assert con.sql("SELECT DISTINCT Physics_Source FROM ard WHERE LogMass_p50 IS NOT NULL").fetchall() == [("synthetic",)]


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
    got = run_query(con, f"cone({ra0}, {dec0}, {r}) & Z < 0.6", ["TargetID"], ard_dir=root)
    t = table.to_pandas()
    sep = regions.angular_separation_deg(t.RA, t.DEC, ra0, dec0)
    want = t[(sep <= r) & (t.Z < 0.6)]
    assert len(want) > 5 and sorted(got.TargetID) == sorted(want.TargetID)
    assert reads_wide(con)  # the toy is compacted: the pruned scan reads the wide table, as `ard` does
    sql = build_sql(f"cone({ra0}, {dec0}, {r})", ["TargetID"], ard_dir=root, compacted=True)
    pruned = data_read_bytes(con, sql)
    full = data_read_bytes(con, f"SELECT TargetID FROM ard WHERE cone(RA, DEC, {ra0}, {dec0}, {r})")
    assert pruned * 20 < full, (pruned, full)


def test_batches_close_their_cursor_when_read_or_dropped(toy):
    """Each output='batches' query runs on its own cursor; it must not outlive the stream."""
    import ard_sql

    root, _, table = toy
    with ard_sql.open(root) as db:
        before = len(db._cursors)
        for _ in range(3):
            reader = db.query("Z < 0.2", ["TargetID"], output="batches", batch_size=500)
            assert len(db._cursors) == before + 1
            assert sum(b.num_rows for b in reader) > 0
            assert len(db._cursors) == before  # exhausted: closed
        reader = db.query("Z < 0.2", ["TargetID"], output="batches", batch_size=500)
        reader.read_next_batch()
        del reader  # dropped half-read
        assert len(db._cursors) == before
        with pytest.raises(QueryError):
            db.query("Nope > 1", output="batches")
        assert len(db._cursors) == before


def test_region_macros_follow_the_ard_view_not_the_files(toy, monkeypatch):
    """cone_search/region_search pick the wide table from the database (reads_wide), with no stat of the partitions."""
    import ard_sql
    from ard_sql.build import compaction

    root, _, _ = toy

    def no_stat(*args, **kwargs):
        raise AssertionError("compaction.is_current called while opening the ARD")

    monkeypatch.setattr(compaction, "is_current", no_stat)
    with ard_sql.open(root) as db:
        assert reads_wide(db.con)
        plan = db.sql("EXPLAIN SELECT count(*) FROM cone_search(150.0, 2.0, 6.0)").fetchall()[0][1]
        got = db.sql("SELECT count(*) FROM cone_search(150.0, 2.0, 6.0)").fetchall()
        assert got == db.sql("SELECT count(*) FROM ard WHERE cone(RA, DEC, 150.0, 2.0, 6.0)").fetchall()
    assert plan.count("READ_PARQUET") == 1, plan  # the wide table alone, no join of the layers


def test_ampersand_between_integers_is_bitwise_as_in_pandas():
    assert filter_to_sql("(PPXF_flag & 8) == 0") == "(PPXF_flag & 8) = 0"
    assert filter_to_sql("Topology_flag & 256") == "(Topology_flag & 256) <> 0"
    assert filter_to_sql("(Lick_flag | 2) == 3 & Z < 0.2") == "(Lick_flag | 2) = 3 AND Z < 0.2"
    assert filter_to_sql("Z < 0.2 & ~(SNR_Median < 5)") == "Z < 0.2 AND NOT (SNR_Median < 5)"
    # nested: inner bit tests are integers to the outer operator (children are converted first)
    assert filter_to_sql("((PPXF_flag & 12) & 8) != 0") == "((PPXF_flag & 12) & 8) <> 0"
    assert filter_to_sql("((PPXF_flag | Topology_flag) & 8) == 0") == "((PPXF_flag | Topology_flag) & 8) = 0"
    assert filter_to_sql("(PPXF_flag & 8) & (Topology_flag & 4)") == "((PPXF_flag & 8) & (Topology_flag & 4)) <> 0"
    assert filter_to_sql("~(PPXF_flag & 8)") == "(~(PPXF_flag & 8)) <> 0"
    with pytest.raises(QueryError, match="joins an integer and a condition"):  # ~ of an integer is an integer
        filter_to_sql("~(PPXF_flag & 8) & Z < 0.2")


def test_order_by_sorts_by_columns_and_directions(toy):
    _, con, table = toy
    t = table.to_pandas()
    got = run_query(con, "Z > 0", ["TargetID", "Z"], order_by="TargetID", limit=5)
    assert got.TargetID.tolist() == sorted(t[t.Z > 0].TargetID)[:5]  # an integer key sorts, it is no condition
    got = run_query(con, "Z > 0", ["TargetID", "Z"], order_by="-TargetID", limit=5)
    assert got.TargetID.tolist() == sorted(t[t.Z > 0].TargetID, reverse=True)[:5]
    got = run_query(con, None, ["TargetID", "Z"], order_by="Z DESC NULLS LAST, TargetID")
    want = t.sort_values(["Z", "TargetID"], ascending=[False, True], na_position="last")
    assert got.TargetID.tolist() == want.TargetID.tolist()
    assert "ORDER BY GREATEST(Z, 0.1) DESC" in build_sql(None, ["TargetID"], order_by="greatest(Z, 0.1) desc")
    for bad, words in (("Z; DROP TABLE core", "';' is not allowed"), ("Nope DESC", "unknown column"),
                       ("Z,", "empty key"), ("(SELECT 1)", "not allowed")):
        with pytest.raises(QueryError, match=words):
            build_sql(None, ["TargetID"], order_by=bad)


def test_flag_tests_match_sql(toy):
    _, con, _ = toy
    # targeting bits and ZWARN (the synthetic catalogue's layer flags are all 0)
    for flt, where in (("(DESI_TARGET & 1) == 0", "(DESI_TARGET & 1) = 0"),
                       ("ZWARN & 4", "(ZWARN & 4) <> 0")):
        got = run_query(con, flt, ["TargetID"])
        want = con.sql(f"SELECT TargetID FROM ard WHERE {where}").df()
        assert sorted(got.TargetID) == sorted(want.TargetID), flt
        assert 0 < len(got) < con.sql("SELECT count(*) FROM ard").fetchall()[0][0]


def test_astropy_output_masks_nulls_and_keeps_integers():
    """NULL is a masked entry, not NaN, and nullable integers stay integers (the catalogue's NULLs)."""
    from ard_sql.query import _to_astropy

    vec = pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32(), 2))
    t = pa.table({"TargetID": pa.array([1, 2, 3], pa.int64()), "Dn4000": pa.array([1.2, None, 1.5]),
                  "ZWARN": pa.array([0, None, 4], pa.int32()), "emb_astro": vec})
    tab = _to_astropy(t)
    assert list(tab["Dn4000"].mask) == [False, True, False] and tab["Dn4000"][0] == 1.2
    assert tab["ZWARN"].dtype.kind == "i" and list(tab["ZWARN"].mask) == [False, True, False]
    assert tab["emb_astro"].shape == (3, 2) and tab["emb_astro"].mask[1].all() and not tab["emb_astro"].mask[0].any()
    assert tab["TargetID"].dtype.kind == "i" and not hasattr(tab["TargetID"], "mask")
