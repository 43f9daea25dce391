"""Sky regions: exact answers (vs brute force) and partition pruning (issue 10)."""

from __future__ import annotations

import re

import healpy as hp
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

import ard_sql
from ard_sql import regions
from ard_sql.build.synth_catalog import SynthOptions, synth_catalog
from ard_sql.query import QueryError, build_sql


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("ard") / "ard"
    # compact=False: these tests exercise the joined (not compacted) path; test_query the compacted one
    synth_catalog(root, SynthOptions(n=20_000, order=2, seed=3, embed_fraction=0.2, compact=False))
    with ard_sql.open(root) as con:
        yield con


@pytest.fixture(scope="module")
def positions(db):
    return db.sql("SELECT TargetID, RA, DEC, Z FROM ard").df()


def files_read(db, sql: str) -> list[int]:
    """'Total Files Read' of every table scan in EXPLAIN ANALYZE."""
    plan = db.sql("EXPLAIN ANALYZE " + sql).fetchall()[0][1]
    return [int(m) for m in re.findall(r"Total Files Read: (\d+)", plan)]


def test_cone_query_exact_vs_astropy(db, positions):
    ra0, dec0, r = 185.0, 30.0, 8.0
    got = db.query(f"cone({ra0}, {dec0}, {r})", ["TargetID"])
    sep = SkyCoord(positions.RA.values * u.deg, positions.DEC.values * u.deg).separation(SkyCoord(ra0 * u.deg, dec0 * u.deg)).deg
    want = positions.TargetID[sep <= r]
    assert len(want) > 50
    assert sorted(got.TargetID) == sorted(want)


def test_cone_query_reads_only_overlapping_partitions(db):
    n_core = len(regions.partition_files(db.path, "core", None))
    sql = build_sql("cone(185, 30, 3) & LogMass_p50 > 9", ["TargetID"], ard_dir=db.path)
    read = files_read(db, sql)
    assert read and max(read) <= 4 < n_core  # a 3-degree cone touches at most a few order-2 pixels
    full = files_read(db, build_sql("LogMass_p50 > 9", ["TargetID"]))
    assert max(full) >= n_core


def test_region_under_or_is_exact_without_pruning(db, positions):
    got = db.query("cone(185, 30, 5) | Z > 1.4", ["TargetID"])
    sep = regions.angular_separation_deg(positions.RA, positions.DEC, 185, 30)
    want = positions.TargetID[(sep <= 5) | (positions.Z > 1.4)]
    assert sorted(got.TargetID) == sorted(want)


def test_cone_search_macro_prunes_and_matches(db, positions):
    got = db.sql("SELECT TargetID FROM cone_search(185.0, 30.0, 8.0)").df()
    sep = regions.angular_separation_deg(positions.RA, positions.DEC, 185, 30)
    assert sorted(got.TargetID) == sorted(positions.TargetID[sep <= 8])
    assert max(files_read(db, "SELECT count(*) FROM cone_search(185.0, 30.0, 3.0)")) <= 4
    plain = db.sql("SELECT count(*) FROM ard WHERE cone(RA, DEC, 185.0, 30.0, 8.0)").fetchall()[0][0]
    assert plain == len(got)


def _in_triangle(ra, dec, tri):
    def vec(r, d):
        r, d = np.radians(r), np.radians(d)
        return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], -1)

    a, b, c = (vec(*v) for v in tri)
    p = vec(np.asarray(ra), np.asarray(dec))
    s = np.sign(np.linalg.det(np.stack([a, b, c])))
    return (
        (np.sign(np.cross(a, b) @ p.T) == s) & (np.sign(np.cross(b, c) @ p.T) == s) & (np.sign(np.cross(c, a) @ p.T) == s)
    )


def test_polygon_region_exact(db, positions):
    tri = [(170.0, 20.0), (200.0, 22.0), (185.0, 45.0)]
    text = "POLYGON " + " ".join(f"{r} {d}" for r, d in tri)
    want = positions.TargetID[_in_triangle(positions.RA, positions.DEC, tri)]
    assert len(want) > 50
    sql_rows = db.sql(f"SELECT TargetID FROM region_search('{text}')").df()
    assert sorted(sql_rows.TargetID) == sorted(want)
    q_rows = db.query(f"in_region('{text}')", ["TargetID"])
    assert sorted(q_rows.TargetID) == sorted(want)
    # clockwise vertices describe the same region
    cw = "POLYGON " + " ".join(f"{r} {d}" for r, d in tri[::-1])
    assert len(db.query(f"in_region('{cw}')", ["TargetID"])) == len(want)


def test_moc_region_exact(db, positions):
    pix2 = hp.ang2pix(4, positions.RA, positions.DEC, nest=True, lonlat=True)
    pix3 = hp.ang2pix(8, positions.RA, positions.DEC, nest=True, lonlat=True)
    inside = (pix2 == 90) | ((pix3 >= 400) & (pix3 <= 403))
    want = positions.TargetID[inside]
    assert len(want) > 20
    got = db.query("in_region('MOC 2/90 3/400-403')", ["TargetID"])
    assert sorted(got.TargetID) == sorted(want)
    got_sql = db.sql("SELECT TargetID FROM region_search('MOC 2/90 3/400-403')").df()
    assert sorted(got_sql.TargetID) == sorted(want)


def test_moc_membership_agrees_on_pixel_boundaries(db):
    """in_region/region_search (Moc.contains) and db.query (Moc.sql_exact on the stored
    _healpix_29) decide a MOC the same way where healpy and HATS assign different pixels."""
    from ard_sql.build.hats_writer import healpix29 as stored_healpix29

    ra = np.array([180.0, 270.0, 90.0, 0.0])
    dec = np.zeros(4)
    stored = stored_healpix29(ra, dec)  # what with_positions writes as _healpix_29
    healpy29 = hp.ang2pix(2**29, ra, dec, lonlat=True, nest=True)
    assert (stored[:2] != healpy29[:2]).all()  # the boundary points this test is about
    cells = {f"29/{p}" for p in np.concatenate([stored, healpy29])}
    cells |= {f"10/{p >> 38}" for p in np.concatenate([stored, healpy29])}
    points = ", ".join(f"({float(r)!r}, {float(d)!r}, {int(h)})" for r, d, h in zip(ra, dec, stored))
    for cell in sorted(cells):
        moc = regions.parse_region(f"MOC {cell}")
        via_query = db.sql(f"SELECT {moc.sql_exact()} FROM (VALUES {points}) AS t(RA, DEC, _healpix_29)").fetchall()
        via_udf = db.sql(f"SELECT in_region(RA, DEC, 'MOC {cell}') FROM (VALUES {points}) AS t(RA, DEC)").fetchall()
        assert [r[0] for r in via_udf] == [r[0] for r in via_query], cell
        assert moc.contains(ra, dec).tolist() == [r[0] for r in via_query], cell
    for i, pix in enumerate(stored):  # each point is inside the cell its stored pixel names
        assert regions.parse_region(f"MOC 29/{pix}").contains(ra[i : i + 1], dec[i : i + 1])[0]


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("in_region('POLYGON 1 2 3')", "ra dec pairs"),
        ("in_region('POLYGON 0 0 10 0 10 10 5 2 0 10')", "convex"),
        ("in_region('BOX 1 2 3 4')", "unknown kind"),
        ("cone(10, 95, 1)", "outside"),
        ("cone(RA, 10, 1)", "must be numbers"),
    ],
)
def test_bad_regions_rejected(bad, msg):
    with pytest.raises(QueryError, match=msg):
        build_sql(bad, ["TargetID"])
