"""The compacted Swiss Army table equals the join of the layers, and is only used while current."""

from __future__ import annotations

import os

import pandas as pd

import ard_sql
from ard_sql import paths
from ard_sql.build import compaction, database
from ard_sql.build.options import BuildOptions
from ard_sql.build.orchestrator import build


def _joined(db) -> pd.DataFrame:
    db.con.execute(database.ard_view_sql(compacted=False).replace("VIEW ard AS", "TEMP VIEW ard_joined AS"))
    return db.sql("SELECT * EXCLUDE (Norder, Npix) FROM ard_joined ORDER BY TargetID").df()


def test_compacted_view_equals_the_join(tmp_path, survey_dir):
    root, _ = survey_dir
    out = tmp_path / "ard"
    report = build(BuildOptions(source=str(root), out=str(out), layers=["lick"], scheduler="sync", progress=False))
    assert report.layers["wide"]["built"] == report.layers["core"]["partitions"] > 0
    assert compaction.is_current(out)
    with ard_sql.open(out) as db:
        assert "FROM wide" in db.sql("SELECT sql FROM duckdb_views() WHERE view_name = 'ard'").fetchall()[0][0]
        wide = db.sql("SELECT * EXCLUDE (Norder, Npix) FROM ard ORDER BY TargetID").df()
        joined = _joined(db)
    assert len(wide) == 24 and wide["Dn4000"].notna().sum() > 0
    pd.testing.assert_frame_equal(wide, joined, check_dtype=False)


def test_a_newer_layer_file_makes_the_views_join_again(tmp_path, survey_dir):
    root, _ = survey_dir
    out = tmp_path / "ard"
    build(BuildOptions(source=str(root), out=str(out), layers=["lick"], scheduler="sync", progress=False))
    order, pixel, f = next(iter(__import__("ard_sql.build.hats_writer", fromlist=["x"]).partition_files(out, "lick")))
    # just newer than the wide file, as a layer partition rewritten after the build (the Bagpipes
    # daemon) would be; not in the future, so that a compaction made now is newer again
    later = paths.partition_file(out, order, pixel, "wide").stat().st_mtime_ns + 1000
    os.utime(f, ns=(later, later))
    assert not compaction.partition_is_current(out, order, pixel) and not compaction.is_current(out)
    database.write_database(out, database.read_provenance(out))
    with ard_sql.open(out) as db:
        assert "LEFT JOIN lick" in db.sql("SELECT sql FROM duckdb_views() WHERE view_name = 'ard'").fetchall()[0][0]
        assert db.sql("SELECT count(*) FROM ard").fetchall()[0][0] == 24
    compaction.compact_partition(out, order, pixel)
    assert compaction.is_current(out)
