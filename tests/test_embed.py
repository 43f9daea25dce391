"""The embed layer (emb_astro, emb_shen), the HNSW indexes and similar()/similar_to()/find_similar.

One tiny ARD is built per module (the small healthy survey plus a pixel whose
first target has no good pixel), with the encoders trained for a few steps only:
these tests check the plumbing and contracts, not the science. The quality of
the embeddings is measured by bench/bench_embeddings.py; the resampling
invariance of emb_shen is checked here on synthetic galaxy-like spectra.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from ard_sql import grid, paths
from tests.conftest import PairSpec, arm_wave, write_pair, write_small_survey

TINY = {"train_max": 16, "train_min_snr": 0.0, "steps": 1, "max_seconds": 5.0, "batch_size": 16}
BAD_PIXEL = 30000
BAD_TID0 = 39627640566179000


def _build(out: Path, source: Path | None, options: dict) -> None:
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import build

    report = build(BuildOptions(source=str(source) if source else None, out=str(out), layers=["embed"],
                                scheduler="sync", progress=False, layer_options={"embed": options}))
    assert not report.errors, report.errors


@pytest.fixture(scope="module")
def embed_ard(tmp_path_factory) -> Path:
    """A tiny ARD with the embed layer built (24 + 3 targets; the first of pixel 30000 has ivar = 0 everywhere)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("survey")
    write_small_survey(root)
    tid = BAD_TID0 + np.arange(3)
    zero = {a: np.where(np.arange(3)[:, None] == 0, 0.0, 4.0) * np.ones((3, len(arm_wave(a))), np.float32) for a in "BRZ"}
    write_pair(root, "main", "dark", BAD_PIXEL, PairSpec(tid, arm_ivar=zero, flux_level=np.array([2.0, 3.0, 4.0], np.float32)))
    out = tmp_path_factory.mktemp("ard") / "ard"
    _build(out, root, TINY)
    return out


def _vectors(ard_dir: Path, column: str = "emb_astro") -> tuple[np.ndarray, np.ndarray]:
    """(TargetID, vectors) of the non-NULL rows, read with plain duckdb."""
    con = duckdb.connect(str(paths.db_path(ard_dir)), read_only=True)
    rows = con.execute(f"SELECT TargetID, {column} FROM embed WHERE {column} IS NOT NULL ORDER BY TargetID").fetchall()
    con.close()
    return np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.float32)


def _brute(ids: np.ndarray, vecs: np.ndarray, q: np.ndarray, k: int, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = 1 - vecs @ q / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(q))
    keep = ids != exclude
    order = np.lexsort((ids[keep], d[keep]))[:k]
    return ids[keep][order], d[keep][order]


# --------------------------------------------------------------------------- the layer


def test_layer_writes_vectors_indexes_and_meta(embed_ard):
    import ard_sql

    db = ard_sql.open(embed_ard)
    n, n_astro, n_shen, dims = db.sql(
        "SELECT count(*), count(emb_astro), count(emb_shen), max(len(emb_astro::FLOAT[])) FROM ard").fetchall()[0]
    assert n == 27 and n_astro == 26 and n_shen == 26 and dims == 768
    # every vector is a real direction: not all zero, finite, and vectors differ
    ids, v = _vectors(embed_ard)
    assert np.isfinite(v).all() and (np.abs(v).sum(1) > 0).all()
    assert np.ptp(v, axis=0).max() > 0
    for col in ("emb_astro", "emb_shen"):
        assert paths.index_file(embed_ard, col).exists()
    meta = dict(db.sql("SELECT name, value FROM ard_meta").fetchall())
    for enc in ("astro", "shen"):
        # both trained with the rest-frame term: ard_meta says what the redshift was used for
        assert "trained self-supervised" in meta[f"embed_{enc}_source"]
        assert "catalogue Z as a rest-frame training target (never an input to the encoder)" in meta[f"embed_{enc}_source"]
    assert "embed_astro_training" in meta and "embed_shen_training" in meta
    from ard_sql.science import specformer

    # 26 spectra are too few to fit the S/N directions (10 per direction + 10): ard_meta says none was removed
    for enc in ("astro", "shen"):
        assert "no S/N direction projected out (too few head spectra to fit one)" in meta[f"embed_{enc}_head"]
    assert f"{specformer.REST_BINS} rest-frame regions (catalogue Z)" in meta["embed_astro_head"]
    assert f"{len(specformer.LINE_WINDOWS)} line windows of +-0.2 % ([OII]3727, [NeIII]3869, Hdelta" in meta["embed_astro_head"]
    assert f"principal directions (whitening eps {specformer.ASTRO_WHITEN_EPS})" in meta["embed_astro_head"]
    assert "PCA-whitened on GALAXY spectra of every S/N" in meta["embed_astro_head"]
    assert "PCA-whitened on the training sample" in meta["embed_shen_head"]
    assert json.loads(meta["index_emb_shen"])["n"] == 26


def test_null_vectors_for_spectra_without_good_pixels(embed_ard):
    import ard_sql

    db = ard_sql.open(embed_ard)
    row = db.sql("SELECT emb_astro IS NULL, emb_shen IS NULL FROM ard WHERE TargetID = ?", [BAD_TID0]).fetchall()
    assert row == [(True, True)]
    # a target without a vector has no neighbours, in both implementations
    assert db.sql("SELECT count(*) FROM similar_to(?, 5)", [BAD_TID0]).fetchall() == [(0,)]
    con = duckdb.connect(str(paths.db_path(embed_ard)), read_only=True)
    assert con.execute("SELECT count(*) FROM similar_to(?, 5)", [BAD_TID0]).fetchall() == [(0,)]


def _tiny_astroclip_checkpoint(path: Path) -> dict:
    """A tiny SpecFormer saved as the full AstroCLIP Lightning checkpoint (prefix spectrum_encoder.backbone.)."""
    from ard_sql.science.specformer import SpecFormer, SpecFormerConfig

    torch.manual_seed(3)
    model = SpecFormer(SpecFormerConfig(embed_dim=48, num_layers=1, num_heads=2, dropout=0.0))
    state = {f"spectrum_encoder.backbone.{k}": v for k, v in model.state_dict().items()}
    state["image_encoder.backbone.patch_embed.weight"] = torch.zeros(4, 3)  # another encoder's weights: ignored
    torch.save({"state_dict": state, "hyper_parameters": {"learning_rate": 1e-4, "temperature": 15.5}, "epoch": 7}, path)
    return model.state_dict()


def test_local_astroclip_checkpoint_loads(embed_ard, tmp_path):
    import ard_sql
    from ard_sql.science import specformer

    ckpt = tmp_path / "astroclip.ckpt"
    saved = _tiny_astroclip_checkpoint(ckpt)
    loaded = specformer.load_checkpoint(ckpt)
    assert loaded.config.embed_dim == 48 and loaded.config.num_layers == 1
    for k, v in saved.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ard = tmp_path / "ard"
    shutil.copytree(embed_ard, ard)
    _build(ard, None, {**TINY, "astroclip_checkpoint": str(ckpt)})
    db = ard_sql.open(ard)
    meta = dict(db.sql("SELECT name, value FROM ard_meta").fetchall())
    assert meta["embed_astro_source"] == "published AstroCLIP weights"
    assert "no S/N direction projected out (too few head spectra to fit one)" in meta["embed_astro_head"]
    assert json.loads(meta["embed_astro_config"])["embed_dim"] == 48
    # the stored vectors come from those weights: 16 regions x 48 = 768, and they match an embedding done here
    used = specformer.load_checkpoint(paths.artifact_dir(ard, "embed") / "specformer.ckpt")
    for k, v in saved.items():
        assert torch.equal(used.state_dict()[k], v), k
    windows = specformer.REST_BINS + len(specformer.LINE_WINDOWS)
    assert used.emb_whiten.shape[0] == windows * 2 * 48 and used.emb_lnwindows.shape == (windows, 2)
    tid, z, stored = db.sql("SELECT TargetID, Z, emb_astro FROM ard WHERE emb_astro IS NOT NULL ORDER BY TargetID LIMIT 1").fetchall()[0]
    spec = db.sql("SELECT spectrum(?) AS s", [tid]).fetchall()[0][0]
    mine = specformer.embed(used, np.asarray(spec["wavelength"]), np.array([spec["flux"]], np.float32),
                            np.array([spec["ivar"]], np.float32), np.array([z]), out_dim=768)[0]
    assert np.allclose(mine, np.asarray(stored), atol=1e-3 * np.abs(mine).max())
    # a file that is not a checkpoint is refused with a clear message
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, bad)
    with pytest.raises(ValueError, match="no SpecFormer weights"):
        specformer.load_checkpoint(bad)


# --------------------------------------------------------------------------- similar / similar_to


@pytest.mark.parametrize("embedding", ["astro", "shen"])
def test_similar_to_returns_k_nearest_first_matching_brute_force(embed_ard, embedding):
    import ard_sql

    db = ard_sql.open(embed_ard)
    ids, vecs = _vectors(embed_ard, f"emb_{embedding}")
    target = int(ids[3])
    got = db.sql(f"SELECT TargetID, distance FROM similar_to({target}, 7, '{embedding}')").fetchall()
    assert len(got) == 7 and target not in [g[0] for g in got]
    dist = np.array([g[1] for g in got])
    assert np.all(np.diff(dist) >= -1e-6)
    want_ids, want_d = _brute(ids, vecs, vecs[3], 7, exclude=target)
    # the index keeps f16 vectors: distances agree to f16 precision and the sets agree
    # except for near-ties at the boundary
    assert np.allclose(dist, want_d, atol=2e-3)
    assert len(set(want_ids) & {g[0] for g in got}) >= 6
    # similar(vector, k): the target itself first, at distance ~0
    q = vecs[3].tolist()
    got2 = db.sql(f"SELECT TargetID, distance FROM similar(?::FLOAT[768], 5, '{embedding}')", [q]).fetchall()
    assert len(got2) == 5 and got2[0][0] == target and abs(got2[0][1]) < 2e-3


def test_persistent_pure_sql_macros_work_without_python(embed_ard):
    """Plain duckdb (no UDFs registered): the persistent brute-force macros answer exactly."""
    ids, vecs = _vectors(embed_ard)
    target = int(ids[5])
    # a fresh process with nothing but duckdb (in this process another connection to the same file
    # may share the database instance and its Python UDFs)
    code = ("import duckdb, json, sys; con = duckdb.connect(sys.argv[1], read_only=True)\n"
            "try:\n    con.execute(\"SELECT ard_similar_to(1, 1, 'astro', NULL)\").fetchall(); udf = True\n"
            "except duckdb.Error:\n    udf = False\n"
            "rows = con.execute(f'SELECT TargetID, distance FROM similar_to({sys.argv[2]}, 6)').fetchall()\n"
            "print(json.dumps({'udf': udf, 'rows': rows}))")
    res = json.loads(subprocess.run([sys.executable, "-c", code, str(paths.db_path(embed_ard)), str(target)],
                                    capture_output=True, text=True, check=True).stdout)
    assert res["udf"] is False  # no Python UDF there: the persistent pure-SQL macro answered
    want_ids, want_d = _brute(ids, vecs, vecs[5], 6, exclude=target)
    assert [r[0] for r in res["rows"]] == want_ids.tolist()
    assert np.allclose([r[1] for r in res["rows"]], want_d, atol=1e-5)
    con = duckdb.connect(str(paths.db_path(embed_ard)), read_only=True)
    got = con.execute(f"SELECT TargetID, distance FROM similar_to({target}, 6)").fetchall()
    want_ids, want_d = _brute(ids, vecs, vecs[5], 6, exclude=target)
    assert [g[0] for g in got] == want_ids.tolist()
    assert np.allclose([g[1] for g in got], want_d, atol=1e-5)
    got_v = con.execute("SELECT TargetID FROM similar(?::FLOAT[768], 4, 'shen')", [_vectors(embed_ard, "emb_shen")[1][0].tolist()]).fetchall()
    assert len(got_v) == 4 and got_v[0][0] == _vectors(embed_ard, "emb_shen")[0][0]
    # filtered form in plain SQL too
    rows = con.execute(f"SELECT s.TargetID, a.Z FROM similar_to({target}, 3, 'astro', "
                       "(SELECT list(TargetID) FROM ard WHERE Z < 0.3)) s JOIN ard a USING (TargetID)").fetchall()
    assert len(rows) == 3 and all(z < 0.3 for _, z in rows)


def test_index_and_brute_force_macros_agree_on_null_and_negative_k(embed_ard):
    """NULL k gives no rows and a negative k an error naming k, on the index path and in plain SQL."""
    import ard_sql

    db = ard_sql.open(embed_ard)
    target = int(_vectors(embed_ard)[0][2])
    con = duckdb.connect(str(paths.db_path(embed_ard)), read_only=True)
    vec = "(SELECT emb_astro FROM ard WHERE emb_astro IS NOT NULL LIMIT 1)"
    for run in (db.sql, con.execute):
        assert run(f"SELECT * FROM similar_to({target}, NULL)").fetchall() == []
        assert run(f"SELECT * FROM similar({vec}, NULL)").fetchall() == []
        assert len(run(f"SELECT * FROM similar_to({target}, 0)").fetchall()) == 0
        # nothing to search (a target without an embedding, a NULL vector): no rows, whatever k
        assert run("SELECT * FROM similar_to(1, -1)").fetchall() == []
        assert run("SELECT * FROM similar(NULL::FLOAT[768], -1)").fetchall() == []
        for q in (f"SELECT * FROM similar_to({target}, -1)", f"SELECT * FROM similar({vec}, -2)"):
            with pytest.raises(duckdb.Error, match="k must be >= 0"):
                run(q).fetchall()


def test_filtered_form_returns_k_rows_satisfying_the_filter(embed_ard):
    import ard_sql

    db = ard_sql.open(embed_ard)
    ids, _ = _vectors(embed_ard)
    target = int(ids[0])
    allowed = "(SELECT list(TargetID) FROM ard WHERE Z < 0.3 AND TargetID % 2 = 0)"
    n_allowed = db.sql(f"SELECT count(*) FROM ard WHERE Z < 0.3 AND TargetID % 2 = 0 AND emb_astro IS NOT NULL "
                       f"AND TargetID <> {target}").fetchall()[0][0]
    k = min(4, n_allowed)
    rows = db.sql(f"SELECT s.TargetID, s.distance, a.Z FROM similar_to({target}, {k}, 'astro', {allowed}) s "
                  "JOIN ard a USING (TargetID)").fetchall()
    assert len(rows) == k and all(z < 0.3 and t % 2 == 0 for t, _, z in rows)
    # the same k rows as the brute-force persistent macro
    con = duckdb.connect(str(paths.db_path(embed_ard)), read_only=True)
    want = con.execute(f"SELECT TargetID FROM similar_to({target}, {k}, 'astro', {allowed})").fetchall()
    assert {r[0] for r in rows} == {w[0] for w in want}


def test_filtered_search_on_a_large_index_oversamples_to_k(tmp_path):
    """The index path of the filtered form (no exact fallback): 4000 clustered vectors, 30% allowed."""
    from ard_sql.similarity import build_index, open_index
    from ard_sql.udfs.similar import filtered_search

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 64))
    vecs = (centres[rng.integers(0, 20, 4000)] + 0.3 * rng.standard_normal((4000, 64))).astype(np.float32)
    keys = np.arange(4000, dtype=np.int64) + 10**12
    build_index(keys, vecs, tmp_path / "i.usearch")
    index = open_index(tmp_path / "i.usearch")
    allowed = keys[rng.random(4000) < 0.3]
    res = filtered_search(index, vecs[7], 25, allowed)
    assert len(res.targetid) == 25 and np.isin(res.targetid, allowed).all()
    assert np.all(np.diff(res.distance) >= 0)
    a = np.isin(keys, allowed)
    d = 1 - vecs[a] @ vecs[7] / (np.linalg.norm(vecs[a], axis=1) * np.linalg.norm(vecs[7]))
    exact = set(keys[a][np.argsort(d)[:25]])
    assert len(exact & set(res.targetid)) >= 23


def test_search_asked_for_the_whole_index_returns_all_of_it(tmp_path):
    """k >= the index size gives every key (an HNSW walk may miss a few: the search then answers exactly)."""
    from ard_sql.similarity import build_index, open_index, search

    rng = np.random.default_rng(2)
    vecs = rng.standard_normal((3000, 32)).astype(np.float32)
    keys = np.arange(3000, dtype=np.int64)
    build_index(keys, vecs, tmp_path / "i.usearch")
    index = open_index(tmp_path / "i.usearch")
    for k in (2999, 3000, 5000):
        res = search(index, vecs[0], k)
        assert len(res.targetid) == min(k, 3000) and len(set(res.targetid.tolist())) == len(res.targetid)
        assert np.all(np.diff(res.distance) >= 0)


def test_filters_that_match_nothing_and_unusable_vectors_give_no_rows(embed_ard):
    """An empty allowed set means no neighbours (not unfiltered ones); NaN or zero query vectors have none; a NULL in
    the allowed list names no target. Index path and brute-force macros agree."""
    import ard_sql

    db = ard_sql.open(embed_ard)
    ids, vecs = _vectors(embed_ard)
    target = int(ids[0])
    assert len(db.find_similar(targetid=target, k=5, where="Z < -100")) == 0
    assert len(db.find_similar(vector=vecs[1], k=5, where="Z < -100")) == 0
    empty = "(SELECT coalesce(list(TargetID), []) FROM ard WHERE Z < -100)"
    brute = duckdb.connect(str(paths.db_path(embed_ard)), read_only=True)
    for con in (db.con, brute):
        assert con.execute(f"SELECT count(*) FROM similar_to({target}, 5, 'astro', {empty})").fetchall() == [(0,)]
        for bad in ([0.0] * 768, [float("nan")] * 768):
            for allowed in ("NULL", "(SELECT list(TargetID) FROM ard)"):
                n = con.execute(f"SELECT count(*) FROM similar(?::FLOAT[], 5, 'astro', {allowed})", [bad]).fetchall()
                assert n == [(0,)], (con is brute, bad[0], allowed)
        rows = con.execute(f"SELECT TargetID FROM similar_to({target}, 5, 'astro', [{int(ids[1])}, NULL])").fetchall()
        assert rows == [(int(ids[1]),)]
    with pytest.raises(duckdb.Error, match="dimensions"):
        db.sql("SELECT * FROM similar(?::FLOAT[], 5, 'astro', (SELECT list(TargetID) FROM ard))", params=[[1.0] * 10]).fetchall()


def test_two_opens_of_one_file_survive_closing_the_first(embed_ard):
    """Both opens share one root connection that owns the UDFs: closing the first leaves the second working (it used
    to call UDFs freed with the first connection and crash), and the last close unmaps the indexes."""
    code = ("import sys, ard_sql\n"
            "a = ard_sql.open(sys.argv[1]); b = ard_sql.open(sys.argv[1])\n"
            "t = int(sys.argv[2])\n"
            "n0 = len(a.find_similar(targetid=t, k=3))\n"
            "a.close(); a.close()\n"
            "n1 = len(b.find_similar(targetid=t, k=3))\n"
            "n2 = b.sql('SELECT count(*) FROM ard WHERE in_region(RA, DEC, \\'CIRCLE 150 2 180\\')').fetchall()[0][0]\n"
            "maps = lambda: open('/proc/self/maps').read().count('.usearch')\n"
            "m1 = maps(); b.close(); m2 = maps()\n"
            "c = ard_sql.open(sys.argv[1]); n3 = len(c.find_similar(targetid=t, k=3)); c.close()\n"
            "print(n0, n1, n2 > 0, m1 > 0, m2, n3)\n")
    target = int(_vectors(embed_ard)[0][0])
    run = subprocess.run([sys.executable, "-c", code, str(embed_ard), str(target)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["3", "3", "True", "True", "0", "3"]


def test_concurrent_searches_keep_their_own_expansion():
    """search() sets expansion_search on a shared index: concurrent queries must not mix them."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from ard_sql.similarity import EXPANSION_SEARCH, search

    class SlowIndex:
        """Reads ``expansion_search`` at the end of a slow search, as the HNSW walk would."""

        ndim = 4

        def __init__(self) -> None:
            self.expansion_search = EXPANSION_SEARCH
            self.seen: list[tuple[int, int]] = []

        def __len__(self) -> int:
            return 10_000

        def search(self, vector: np.ndarray, k: int) -> SimpleNamespace:
            time.sleep(0.005)
            self.seen.append((k, self.expansion_search))
            return SimpleNamespace(keys=np.arange(k), distances=np.zeros(k, np.float32))

    index = SlowIndex()
    ks = [10, 2000] * 8
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda k: search(index, np.ones(4, np.float32), k), ks))
    assert len(index.seen) == len(ks)
    assert all(exp == max(EXPANSION_SEARCH, 2 * k) for k, exp in index.seen), index.seen


def test_find_similar_returns_a_dataframe_joined_with_the_catalog(embed_ard):
    import ard_sql

    db = ard_sql.open(embed_ard)
    ids, vecs = _vectors(embed_ard, "emb_shen")
    df = db.find_similar(targetid=int(ids[2]), k=5, embedding="shen")
    assert len(df) == 5 and list(df.columns[:2]) == ["distance", "TargetID"]
    assert {"RA", "DEC", "Z", "emb_astro"} <= set(df.columns)
    assert df["distance"].is_monotonic_increasing and int(ids[2]) not in df["TargetID"].tolist()
    df2 = db.find_similar(vector=vecs[2], k=3, embedding="shen", where="Z < 0.3")
    assert len(df2) == 3 and (df2["Z"] < 0.3).all()
    with pytest.raises(ValueError):
        db.find_similar(k=3)
    with pytest.raises(ValueError, match="target 123 is not in the ARD"):
        db.find_similar(targetid=123, k=3)


# --------------------------------------------------------------------------- resampling invariance


def galaxy_like_spectra(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(wave, flux, ivar, z) on the DESI brz grid: continuum with a 4000 A break, absorption and emission lines, noise."""
    rng = np.random.default_rng(seed)
    wave = grid.brz_wavelength()
    z = rng.uniform(0.05, 0.5, n)
    rest = wave[None, :] / (1 + z[:, None])
    brk = rng.uniform(1.1, 2.0, n)[:, None]
    cont = np.where(rest < 4000, 1.0, brk) * (rest / 5000) ** rng.uniform(-1.5, 0.5, n)[:, None]
    flux = cont.copy()
    for line, sign in ((3934, -1), (3969, -1), (4102, -1), (4861, 1), (5007, 1), (6563, 1), (3727, 1), (5175, -1)):
        amp = rng.uniform(0.0, 3.0, n)[:, None] if sign > 0 else rng.uniform(0.1, 0.4, n)[:, None]
        flux += sign * amp * np.exp(-0.5 * ((rest - line) / 3.0) ** 2) * (1 if sign > 0 else cont)
    level = rng.uniform(2, 8, n)[:, None]
    sigma = 0.05 * level
    flux = level * flux + sigma * rng.standard_normal(flux.shape)
    return wave, flux.astype(np.float32), np.broadcast_to(1 / sigma**2, flux.shape).astype(np.float32).copy(), z


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _resampling_check(seconds: float, n_train: int) -> np.ndarray:
    from ard_sql.science import restframe, shen

    torch.manual_seed(0)
    wave, flux, ivar, z = galaxy_like_spectra(n_train + 20, seed=1)
    # trained as the layer trains it: with the rest-frame term (z a target, never an input)
    model, log = shen.train(wave, flux[:n_train], ivar[:n_train], z=z[:n_train], epochs=50, max_seconds=seconds)
    assert log["recipe"]["rest_weight"] == restframe.REST_WEIGHT
    test_f, test_i = flux[n_train:], ivar[n_train:]
    e_desi = shen.embed(model, wave, test_f, test_i)
    lw, lf, li = shen.resample_loglam(wave, test_f, test_i)
    assert abs(np.log10(lw[1] / lw[0]) - 1e-4) < 1e-9 and len(lw) != len(wave)
    e_sdss = shen.embed(model, lw, lf, li)
    return _cosines(e_desi, e_sdss)


def test_emb_shen_resampling_invariance():
    """The same spectrum on an SDSS-like log-lambda grid embeds within cosine 0.95 of the DESI-grid one."""
    torch.set_num_threads(1)
    cos = _resampling_check(seconds=12, n_train=96)
    assert cos.min() > 0.95, cos


@pytest.mark.slow
def test_emb_shen_resampling_invariance_trained_longer():
    torch.set_num_threads(2)
    cos = _resampling_check(seconds=120, n_train=600)
    assert cos.min() > 0.95, cos


# --------------------------------------------------------------------------- embedding head


def test_whitening_regularisation_sets_the_weight_of_each_direction():
    """After whitening, direction i has variance lambda_i / (lambda_i + eps lambda_max): eps decides how much the small ones count."""
    from ard_sql.science.specformer import WHITEN_EPS, fit_whitening

    x = np.random.default_rng(0).standard_normal((4000, 5)) * np.array([10.0, 3.0, 1.0, 0.3, 0.1])
    lam = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))
    for eps in (0.1, 0.01):
        centre, whiten, _ = fit_whitening(x, eps)
        got = np.sort(np.var((x - centre) @ whiten, axis=0))
        np.testing.assert_allclose(got, lam / (lam + eps * lam.max()), rtol=1e-4)
    np.testing.assert_array_equal(fit_whitening(x)[1], fit_whitening(x, WHITEN_EPS)[1])


def test_shen_fit_head_uses_the_given_regularisation():
    from ard_sql.science import shen

    torch.manual_seed(0)
    wave, flux, ivar, _ = galaxy_like_spectra(200, seed=3)
    model = shen.ShenEncoder(shen.ShenConfig(embed_dim=16, num_layers=1, num_heads=2))
    for eps in (0.1, 0.01):
        shen.fit_head(model, wave, flux, ivar, eps=eps, grid_noise_weight=0.0, snr_directions=0)
        emb = shen.embed(model, wave, flux, ivar)
        var = np.linalg.eigvalsh(np.cov(emb.T.astype(np.float64), bias=True))
        assert var.max() == pytest.approx(1 / (1 + eps), rel=1e-3)


def test_fit_whitening_damps_the_noise_directions():
    from ard_sql.science.specformer import fit_whitening

    x = np.random.default_rng(0).normal(size=(4000, 3)) * np.array([3.0, 2.0, 1.0])
    noise = np.diag([0.0, 0.0, 15.0])  # the third axis is mostly noise: 1 + 15
    centre, whiten, removed = fit_whitening(x, 0.0, noise)
    assert removed == 0
    var = np.var((x - centre) @ whiten, axis=0)
    got = np.sort(var)
    np.testing.assert_allclose(got, np.sort([1.0, 1.0, 1.0 / 16.0]), rtol=0.05)


def test_snr_projection_removes_the_direction_that_snr_predicts():
    """A planted S/N direction is removed; the other directions (and rows' distances along them) are kept."""
    from ard_sql.science.specformer import median_snr, snr_projection

    rng = np.random.default_rng(1)
    snr = 10 ** rng.uniform(0.3, 1.7, 3000)
    x = rng.normal(size=(3000, 8))
    u = np.zeros(8)
    u[[2, 5]] = [0.6, 0.8]
    x += 4.0 * np.outer(np.log10(snr) - np.log10(snr).mean(), u)
    project = snr_projection(x, snr, 1)
    y = x @ project
    assert abs(np.corrcoef(y @ u, np.log10(snr))[0, 1]) < 0.02 < abs(np.corrcoef(x @ u, np.log10(snr))[0, 1]) - 0.5
    assert np.abs(y[:, [0, 1, 3, 4, 6, 7]] - x[:, [0, 1, 3, 4, 6, 7]]).mean() < 0.02  # the rest kept (up to the fit's noise)
    assert snr_projection(x, snr, 0) is None and snr_projection(x[:5], snr[:5], 1) is None
    flux = np.array([[1.0, -2.0, 3.0, np.nan], [1.0, 1.0, 1.0, 1.0]])
    ivar = np.array([[4.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    got = median_snr(flux, ivar)
    assert got[0] == 2.0 and np.isnan(got[1])


def test_shen_grid_noise_damping_makes_the_head_grid_steadier():
    """The head fitted with grid-noise damping moves less when the same spectra are read on another grid."""
    from ard_sql.science import shen

    wave, flux, ivar, z = galaxy_like_spectra(240, seed=5)
    model, _ = shen.train(wave, flux[:160], ivar[:160], shen.ShenConfig(embed_dim=32, num_layers=1, num_heads=2),
                          z=z[:160], epochs=2, batch_size=32)
    lw, lf, li = shen.resample_loglam(wave, flux[160:], ivar[160:], 1e-4)

    def worst_cosine() -> float:
        a, b = shen.embed(model, wave, flux[160:], ivar[160:]), shen.embed(model, lw, lf, li)
        return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

    # the damping alone (the S/N projection is tested on its own)
    shen.fit_head(model, wave, flux[:160], ivar[:160], grid_noise_weight=0.0, snr_directions=0)
    plain = worst_cosine()
    shen.fit_head(model, wave, flux[:160], ivar[:160], snr_directions=0)
    assert shen.GRID_NOISE_WEIGHT > 0
    assert worst_cosine() > plain


def test_shen_grid_consistency_term_makes_the_encoder_grid_steadier():
    """Trained with the grid-consistency term, faint spectra's pooled tokens move less (relative to their spread)
    when the spectra are read on the resampling check's grid, which the term never trains on."""
    from ard_sql.science import shen

    torch.set_num_threads(1)
    rng = np.random.default_rng(7)
    wave, flux, ivar, z = galaxy_like_spectra(200, seed=7)
    # faint (S/N ~ 2 a pixel): where the binning moves a spectrum's tokens
    flux = (flux + np.sqrt(99.0) / np.sqrt(ivar) * rng.standard_normal(flux.shape)).astype(np.float32)
    ivar = (ivar / 100.0).astype(np.float32)
    cfg = shen.ShenConfig(embed_dim=32, num_layers=1, num_heads=2)
    lw, lf, li = shen.resample_loglam(wave, flux[160:], ivar[160:], 1e-4)
    assert 1e-4 not in shen.CONSISTENCY_DLOGLAMS and shen.CONSISTENCY_WEIGHT > 0

    def relative_move(weight: float) -> float:
        # the noise-consistency term off: it moves faint spectra's tokens too, and this test isolates the grid term
        model, log = shen.train(wave, flux[:160], ivar[:160], cfg, z=z[:160], consistency_weight=weight,
                                noise_weight=0.0, epochs=30, batch_size=16, seed=0)
        assert log["recipe"]["consistency_weight"] == weight

        def pooled(w: np.ndarray, f: np.ndarray, i: np.ndarray) -> np.ndarray:
            ft, et, pt = (torch.from_numpy(a) for a in shen.bin_spectra(w, f, i, cfg)[:3])
            with torch.no_grad():
                return model.region_pooled(ft, et, pt).numpy()

        a, b = pooled(wave, flux[160:], ivar[160:]), pooled(lw, lf, li)
        return float(np.square(a - b).sum(1).mean() / a.var(0).sum())

    # a weight above the layer's: this tiny model trains 300 steps, the layer's ~700 with more spectra a step
    assert relative_move(1e4) < 0.7 * relative_move(0.0)


def _spread_of_noise(n: int, seed: int, degree: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(wave, flux, ivar, z, basis): galaxy-like spectra with noise x1 to x20, and the centred powers 1..degree of their log S/N."""
    from ard_sql.science.specformer import median_snr

    rng = np.random.default_rng(seed)
    wave, flux, ivar, z = galaxy_like_spectra(n, seed=seed)
    k = 10 ** rng.uniform(0, 1.3, len(flux))[:, None]
    flux = (flux + np.sqrt(k**2 - 1) / np.sqrt(ivar) * rng.standard_normal(flux.shape)).astype(np.float32)
    ivar = (ivar / k**2).astype(np.float32)
    s = np.log10(median_snr(flux, ivar))
    basis = np.column_stack([s**d for d in range(1, degree + 1)])
    return wave, flux, ivar, z, basis - basis.mean(0)


def _explained(emb: np.ndarray, basis: np.ndarray) -> float:
    """Share of the centred vectors' variance that a least-squares fit on ``basis`` explains."""
    emb = emb.astype(np.float64) - emb.mean(0)
    coef, *_ = np.linalg.lstsq(basis, emb, rcond=None)
    return float(np.square(basis @ coef).sum() / np.square(emb).sum())


def test_shen_head_projects_out_the_snr_directions():
    """With a spread of noise levels, emb_shen's head leaves no part of the vector that a cubic in log S/N predicts."""
    from ard_sql.science import shen

    wave, flux, ivar, _, basis = _spread_of_noise(300, seed=4, degree=3)
    model = shen.ShenEncoder(shen.ShenConfig(embed_dim=16, num_layers=1, num_heads=2))

    def explained(snr_directions: int) -> float:
        shen.fit_head(model, wave, flux, ivar, snr_directions=snr_directions, grid_noise_weight=0.0)
        return _explained(shen.embed(model, wave, flux, ivar), basis)

    assert shen.SNR_DIRECTIONS == 3
    assert explained(0) > 0.05 and explained(3) < 1e-6


def test_specformer_training_fits_the_head_with_the_snr_direction_out():
    """``specformer.train`` hands its head the spectra's ivar: the stored emb_astro has no direction log S/N predicts."""
    from ard_sql.science import specformer

    wave, flux, ivar, z, basis = _spread_of_noise(120, seed=6, degree=1)
    cfg = specformer.SpecFormerConfig(embed_dim=16, num_layers=1, num_heads=2, dropout=0.0)
    torch.set_num_threads(1)
    kw = {"epochs": 1, "batch_size": 16, "crop": 64, "out_dim": 32, "device": "cpu", "seed": 0}
    model, log = specformer.train(flux, ivar, cfg, wave=wave, z=z, **kw)
    assert log["recipe"]["snr_directions"] == specformer.SNR_DIRECTIONS >= 1
    assert _explained(specformer.embed(model, wave, flux, ivar, z, out_dim=32), basis) < 1e-6
    # the same weights with a head fitted without the S/N: the direction is there to remove
    specformer.fit_embedding_head(model, wave, flux, None, z, out_dim=32, seed=0)
    assert _explained(specformer.embed(model, wave, flux, ivar, z, out_dim=32), basis) > 0.01


class _LnLambdaTokens(torch.nn.Module):
    """A stand-in encoder whose patch token j outputs (ln lambda_j, -ln lambda_j): pooling can be read off."""

    def __init__(self, wave: np.ndarray):
        super().__init__()
        from ard_sql.science import specformer

        self.config = specformer.SpecFormerConfig(embed_dim=2, num_layers=1, num_heads=1)
        self.lnl = torch.from_numpy(specformer.token_lnlam(wave, self.config).astype(np.float32))
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, flux: torch.Tensor) -> dict[str, torch.Tensor]:
        tok = torch.stack([self.lnl, -self.lnl], 1).expand(len(flux), -1, -1)
        return {"embedding": torch.cat([torch.zeros(len(flux), 1, 2), tok], 1)}


def test_rest_pooling_places_tokens_at_their_rest_wavelength():
    """emb_astro's head: each window pools the tokens whose rest wavelength (catalogue Z) lies in it; a line
    window overlapping a region pools its own tokens independently."""
    from ard_sql.science import specformer

    wave = grid.brz_wavelength()
    model = _LnLambdaTokens(wave)
    z = np.array([0.1, 1.2, np.nan, 3.5, -0.5])
    edges = np.log(np.geomspace(3300.0, 7000.0, 5))
    windows = np.concatenate([np.stack([edges[:-1], edges[1:]], 1), np.log([[4977.0, 5038.0]])])
    pooled = specformer.rest_pooled(model, wave, np.ones((5, len(wave)), np.float32), z, windows).reshape(5, 5, 2, 2)
    lnl = specformer.token_lnlam(wave, model.config)
    for row in (0, 1):
        rest = lnl - np.log1p(z[row])
        for k, (lo, hi) in enumerate(windows):
            inside = (rest >= lo) & (rest < hi)
            if not inside.any():
                assert np.isnan(pooled[row, k]).all()
                continue
            mean, peak = pooled[row, k, 0, 0] - np.log1p(z[row]), pooled[row, k, 1, 0] - np.log1p(z[row])
            assert mean == pytest.approx(rest[inside].mean(), abs=1e-5) and peak == pytest.approx(rest[inside].max(), abs=1e-5)
            assert pooled[row, k, 1, 1] == pytest.approx(-lnl[inside].min(), abs=1e-5)  # the max of each channel
    # the line window holds a few tokens near 5008 A, inside the third region's wider range
    assert 5000 < np.exp(pooled[0, 4, 0, 0] - np.log1p(0.1)) < 5016 and pooled[0, 4, 1, 0] < pooled[0, 2, 1, 0]
    # at z = 1.2 the grid's red end (9824 A) is 4465 A at rest: the regions above 4806 A and the line are not reached
    assert not np.isnan(pooled[0]).any() and np.isnan(pooled[1, 2:]).all() and not np.isnan(pooled[1, :2]).any()
    # no redshift, a redshift that puts every token beyond the range, or an unphysical one: no region at all
    assert np.isnan(pooled[2:]).all()
    with pytest.raises(ValueError, match="grid must ascend"):
        specformer.rest_pooled(model, wave[::-1].copy(), np.ones((1, len(wave)), np.float32), z[:1], windows)
    # masked pixels: tokens mostly masked are left out of the windows, a window holding only such tokens is not reached
    good = np.ones((1, len(wave)), bool)
    good[0, (wave > 4960.0 * 1.1) & (wave < 5055.0 * 1.1)] = False  # the line window at z = 0.1, and a token beyond
    good[0, ::7] = False  # a scattered bad pixel or two per token changes nothing
    masked = specformer.rest_pooled(model, wave, np.ones((1, len(wave)), np.float32), z[:1], windows, good=good).reshape(5, 2, 2)
    assert np.isnan(masked[4]).all() and np.array_equal(masked[:2], pooled[0, :2]) and np.array_equal(masked[3], pooled[0, 3])
    frac = specformer.token_good_fraction(good, model.config)[0]
    inside = ((lnl - np.log1p(0.1)) >= windows[2, 0]) & ((lnl - np.log1p(0.1)) < windows[2, 1])
    kept = inside & (frac >= specformer.TOKEN_MIN_GOOD)
    assert 0 < kept.sum() < inside.sum()
    assert masked[2, 0, 0] - np.log1p(0.1) == pytest.approx((lnl[kept] - np.log1p(0.1)).mean(), abs=1e-5)


def test_head_windows_are_contiguous_regions_then_the_lines():
    """The head's windows: REST_BINS equal ln-lambda regions over the range the redshifts allow, then
    +-LINE_HALF_WIDTH around each line of LINE_WINDOWS; the summary says what the head was fitted with."""
    from ard_sql.science import specformer

    wave = grid.brz_wavelength()
    z = np.linspace(0.02, 0.4, 200)
    win = specformer.rest_head_windows(wave, z)
    regions, lines = win[:specformer.REST_BINS], win[specformer.REST_BINS:]
    assert len(lines) == len(specformer.LINE_WINDOWS) == 12
    np.testing.assert_allclose(regions[1:, 0], regions[:-1, 1])
    np.testing.assert_allclose(np.diff(regions, axis=1), np.diff(regions[:1], axis=1).item())
    z05, z50 = np.quantile(z, specformer.REST_QUANTILES)
    assert np.exp(regions[0, 0]) == pytest.approx(wave[0] / (1 + z05)) and np.exp(regions[-1, 1]) == pytest.approx(wave[-1] / (1 + z50))
    centres = np.array(list(specformer.LINE_WINDOWS.values()))
    np.testing.assert_allclose(np.exp(lines), centres[:, None] * (1 + np.array([-1, 1]) * specformer.LINE_HALF_WIDTH))
    assert specformer.LINE_WINDOWS["[OIII]5007"] == pytest.approx(5008.24)
    wave2, flux, ivar, zs = galaxy_like_spectra(64, seed=11)
    cfg = specformer.SpecFormerConfig(embed_dim=16, num_layers=1, num_heads=2, dropout=0.0)
    torch.manual_seed(0)
    model = specformer.SpecFormer(cfg)
    specformer.fit_embedding_head(model, wave2, flux, None, zs, out_dim=32, eps=0.05, snr_directions=2)
    summary = specformer.head_summary(model)
    # the values it was fitted with, not the module's defaults; no ivar: no S/N direction could be removed
    assert summary["whiten_eps"] == 0.05 and summary["snr_directions"] == 0
    assert summary["head_lines"] == list(specformer.LINE_WINDOWS) and summary["head_regions"] == specformer.REST_BINS
    # with ivar, what was removed: 2 directions from 64 spectra, none from 15 (too few rows to fit a quadratic in S/N)
    specformer.fit_embedding_head(model, wave2, flux, ivar, zs, out_dim=32, snr_directions=2)
    assert specformer.head_summary(model)["snr_directions"] == 2
    specformer.fit_embedding_head(model, wave2, flux[:15], ivar[:15], zs[:15], out_dim=32, snr_directions=2)
    assert specformer.head_summary(model)["snr_directions"] == 0


def test_emb_astro_head_round_trips_through_a_checkpoint(tmp_path):
    """The head (windows, centre, whitening and what it was fitted with) is saved beside the weights and gives
    the same vectors when loaded; a head from before recipe 11 (no line windows) is dropped, for the build to refit."""
    from ard_sql.science import specformer

    wave, flux, ivar, z = galaxy_like_spectra(64, seed=11)
    cfg = specformer.SpecFormerConfig(embed_dim=16, num_layers=1, num_heads=2, dropout=0.0)
    torch.manual_seed(0)
    model = specformer.SpecFormer(cfg)
    specformer.fit_embedding_head(model, wave, flux, ivar, z, out_dim=32, seed=0)
    specformer.save_checkpoint(model, tmp_path / "m.ckpt")
    loaded = specformer.load_checkpoint(tmp_path / "m.ckpt")
    assert specformer.head_summary(loaded) == specformer.head_summary(model)
    np.testing.assert_array_equal(specformer.embed(loaded, wave, flux[:8], ivar[:8], z[:8], out_dim=32),
                                  specformer.embed(model, wave, flux[:8], ivar[:8], z[:8], out_dim=32))
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    ckpt["emb_head"] = {"rest_lnedges": torch.linspace(8.1, 8.9, 25, dtype=torch.float64),
                        "centre": ckpt["emb_head"]["centre"], "whiten": ckpt["emb_head"]["whiten"]}
    torch.save(ckpt, tmp_path / "r10.ckpt")
    with pytest.raises(ValueError, match="no embedding head"):
        specformer.embed(specformer.load_checkpoint(tmp_path / "r10.ckpt"), wave, flux[:1], ivar[:1], z[:1])


def test_emb_astro_is_null_without_a_usable_redshift():
    """A NaN Z, or one that leaves the head's rest range unreached, gives a NULL (NaN) row; the rest of the
    batch is unaffected. Without a head, or without redshifts to fit one, the error says what is missing."""
    from ard_sql.science import specformer

    wave, flux, ivar, z = galaxy_like_spectra(64, seed=11)
    cfg = specformer.SpecFormerConfig(embed_dim=16, num_layers=1, num_heads=2, dropout=0.0)
    torch.manual_seed(0)
    model = specformer.SpecFormer(cfg)
    specformer.fit_embedding_head(model, wave, flux, ivar, z, out_dim=32, seed=0)
    zz = z[:4].copy()
    zz[1], zz[2] = np.nan, 4.0
    out = specformer.embed(model, wave, flux[:4], ivar[:4], zz, out_dim=32)
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
    np.testing.assert_allclose(out[[0, 3]], specformer.embed(model, wave, flux[[0, 3]], ivar[[0, 3]], z[[0, 3]], out_dim=32),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no embedding head"):
        specformer.embed(specformer.SpecFormer(cfg), wave, flux[:1], ivar[:1], z[:1])
    with pytest.raises(ValueError, match="usable catalogue Z"):
        specformer.fit_embedding_head(model, wave, flux, ivar, np.full(len(z), np.nan), out_dim=32)


def test_restframe_targets_place_features_at_their_rest_wavelength():
    from ard_sql.science import restframe

    wave = grid.brz_wavelength()
    z = np.array([0.1, 0.4, np.nan])
    rest = wave[None, :] / (1 + np.nan_to_num(z)[:, None])
    flux = 1.0 + 5.0 * np.exp(-0.5 * ((rest - 5007.0) / 2.0) ** 2)
    ivar = np.full_like(flux, 100.0)
    ivar[0, 1000:1010] = 0.0  # a masked run must not count
    target, weight = restframe.restframe_targets(wave, flux, ivar, z, np.ones(3), err_floor=0.02)
    edges = np.exp(np.log(restframe.REST_RANGE[0]) + restframe.REST_DLNL * np.arange(target.shape[1] + 1))
    line_bin = np.searchsorted(edges, 5007.0) - 1
    for row in (0, 1):
        assert np.argmax(target[row]) == line_bin
        covered = (edges[1:] > wave[0] / (1 + z[row])) & (edges[:-1] < wave[-1] / (1 + z[row]))
        assert np.all(weight[row, ~covered] == 0) and np.all(weight[row, covered][1:-1] > 0)
        # weight = 1 / (error^2 + floor^2) of an ivar-weighted mean
        assert weight[row, line_bin] < 1 / 0.02**2
    assert np.all(weight[2] == 0), "a row without a redshift gets no rest-frame weight"


def test_window_weight_keeps_only_the_rest_range_a_window_covers():
    """SpecFormer trains on windows of the spectrum: rest-frame bins outside the window's range weigh nothing."""
    from ard_sql.science import restframe

    weight = torch.ones(2, restframe.REST_NBIN)
    ln1pz = torch.log1p(torch.tensor([0.1, 0.5]))
    out = restframe.window_weight(weight, np.log(4000.0), np.log(5000.0), ln1pz)
    centres = np.exp(np.log(restframe.REST_RANGE[0]) + restframe.REST_DLNL * (np.arange(restframe.REST_NBIN) + 0.5))
    for row, z in enumerate((0.1, 0.5)):
        kept = out[row].numpy() > 0
        assert kept.any()
        assert centres[kept].min() >= 4000 / (1 + z) - 10 and centres[kept].max() <= 5000 / (1 + z) + 10
        inside = (centres > 4000 / (1 + z) + 10) & (centres < 5000 / (1 + z) - 10)
        assert kept[inside].all()


def test_shen_rest_term_changes_training_but_not_the_stored_model():
    from ard_sql.science import restframe, shen

    wave, flux, ivar, z = galaxy_like_spectra(64, seed=5)
    cfg = shen.ShenConfig(embed_dim=16, num_layers=1, num_heads=2)
    torch.set_num_threads(1)
    plain, plog = shen.train(wave, flux, ivar, cfg, epochs=2, seed=0)
    rest, rlog = shen.train(wave, flux, ivar, cfg, z=z, epochs=2, seed=0)
    unknown, ulog = shen.train(wave, flux, ivar, cfg, z=np.full(64, np.nan), epochs=2, seed=0)
    assert plog["recipe"]["rest_weight"] == 0.0 and ulog["recipe"]["rest_weight"] == 0.0
    assert rlog["recipe"]["rest_weight"] == restframe.REST_WEIGHT
    # the decoder is a training device: the stored weights are the encoder's alone
    assert set(rest.state_dict()) == set(plain.state_dict()) == set(shen.ShenEncoder(cfg).state_dict())
    assert not torch.equal(rest.token_embed.weight, plain.token_embed.weight)
    torch.testing.assert_close(unknown.token_embed.weight, plain.token_embed.weight)
    # embedding needs no redshift
    assert np.isfinite(shen.embed(rest, wave, flux[:4], ivar[:4])).all()


@pytest.mark.parametrize("crop", [None, 64])
def test_specformer_rest_term_changes_training_but_not_the_stored_model(crop):
    """emb_astro's rest-frame term, on the whole spectrum and on training windows: the stored weights stay AstroCLIP's."""
    from ard_sql.science import restframe, specformer

    wave, flux, ivar, z = galaxy_like_spectra(32, seed=5)
    cfg = specformer.SpecFormerConfig(embed_dim=16, num_layers=1, num_heads=2, dropout=0.0)
    torch.set_num_threads(1)
    kw = {"epochs": 2, "batch_size": 16, "crop": crop, "out_dim": 32, "device": "cpu", "seed": 0}
    plain, plog = specformer.train(flux, ivar, cfg, fit_head=False, **kw)
    rest, rlog = specformer.train(flux, ivar, cfg, wave=wave, z=z, **kw)
    unknown, ulog = specformer.train(flux, ivar, cfg, wave=wave, z=np.full(32, np.nan), fit_head=False, **kw)
    assert plog["recipe"]["rest_weight"] == 0.0 and ulog["recipe"]["rest_weight"] == 0.0
    assert rlog["recipe"]["rest_weight"] == restframe.REST_WEIGHT
    assert set(rest.state_dict()) == set(plain.state_dict()) == set(specformer.SpecFormer(cfg).state_dict())
    assert not torch.equal(rest.data_embed.weight, plain.data_embed.weight)
    torch.testing.assert_close(unknown.data_embed.weight, plain.data_embed.weight)
    assert np.isfinite(specformer.embed(rest, wave, flux[:4], ivar[:4], z[:4], out_dim=32)).all()
    # the head is fitted from the grid and the redshifts: training without them says so
    with pytest.raises(ValueError, match="needs the spectra's grid"):
        specformer.train(flux, ivar, cfg, **kw)


# --------------------------------------------------------------------------- devices and training hooks


def test_device_choice():
    from ard_sql.science.specformer import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_a_wrong_device_option_fails_before_training(embed_ard):
    from ard_sql.build.layers.embed import train_encoders

    with pytest.raises(ValueError, match="embed layer option device='nonsense'"):
        train_encoders(embed_ard, {**TINY, "device": "nonsense"})


def test_training_calls_back_every_step_and_trains_a_given_model_in_place():
    """The hook bench/gpu_embeddings.py snapshots weights with; a given model is the one trained and returned on the CPU."""
    from ard_sql.science import shen, specformer

    torch.set_num_threads(1)
    wave, flux, ivar, z = galaxy_like_spectra(48, seed=7)
    cfg = shen.ShenConfig(embed_dim=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    given = shen.ShenEncoder(cfg)
    initial = given.token_embed.weight.detach().clone()
    seen: list[tuple[int, float]] = []
    model, log = shen.train(wave, flux, ivar, z=z, epochs=2, batch_size=16, seed=0, device="cpu",
                            model=given, callback=lambda steps, seconds: seen.append((steps, seconds)))
    assert model is given and log["device"] == "cpu" and next(model.parameters()).device.type == "cpu"
    assert [s for s, _ in seen] == list(range(1, log["steps"] + 1)) and log["steps"] == 6
    assert all(b >= a for (_, a), (_, b) in zip(seen, seen[1:]))
    assert not torch.equal(given.token_embed.weight, initial), "the given model itself is trained"

    calls = []
    acfg = specformer.SpecFormerConfig(embed_dim=16, num_layers=1, num_heads=2, dropout=0.0)
    kw = {"epochs": 1, "batch_size": 16, "crop": None, "out_dim": 32, "device": "cpu", "seed": 0}
    torch.manual_seed(0)
    given = specformer.SpecFormer(acfg)
    astro, alog = specformer.train(flux, ivar, model=given, callback=lambda steps, seconds: calls.append(steps),
                                   fit_head=False, **kw)
    assert astro is given and calls == [1, 2, 3] and alog["device"] == "cpu"
    # seeded before it is built, a given SpecFormer trains exactly as train() would train its own
    # (without dropout, which would draw from torch's global generator in another state)
    fresh, _ = specformer.train(flux, ivar, acfg, fit_head=False, **kw)
    torch.testing.assert_close(fresh.data_embed.weight, given.data_embed.weight, rtol=0, atol=0)


def test_a_step_budget_takes_that_many_steps_whatever_the_passes():
    """``steps`` counts optimizer steps across passes over the data (the layer's budget, the same on a slow and a fast
    machine): the same budget gives the same weights, and ``max_seconds`` still caps it."""
    from ard_sql.science import shen, specformer

    torch.set_num_threads(1)
    wave, flux, ivar, z = galaxy_like_spectra(48, seed=7)  # 3 batches of 16 per pass
    cfg = shen.ShenConfig(embed_dim=16, num_layers=1, num_heads=2)
    kw = {"batch_size": 16, "seed": 0, "device": "cpu", "epochs": 1}
    a, alog = shen.train(wave, flux, ivar, cfg, z=z, steps=7, **kw)
    assert alog["steps"] == 7 and len(alog["epoch_loss"]) == 3 and not alog["stopped_by_time"]
    assert alog["recipe"]["step_budget"] == 7 and "epochs" not in alog["recipe"]
    b, _ = shen.train(wave, flux, ivar, cfg, z=z, steps=7, **kw)
    torch.testing.assert_close(a.token_embed.weight, b.token_embed.weight, rtol=0, atol=0)
    _, clog = shen.train(wave, flux, ivar, cfg, steps=100_000, max_seconds=0.5, **kw)
    assert clog["stopped_by_time"] and 0 < clog["steps"] < 100_000
    acfg = specformer.SpecFormerConfig(embed_dim=16, num_layers=1, num_heads=2, dropout=0.0)
    _, slog = specformer.train(flux, ivar, acfg, steps=5, crop=None, out_dim=32, fit_head=False, **kw)
    assert slog["steps"] == 5 and len(slog["epoch_loss"]) == 2 and slog["recipe"]["step_budget"] == 5


def test_each_encoder_trains_its_own_default_steps_unless_steps_sets_both(embed_ard, monkeypatch):
    """Recipe 14: emb_astro trains DEFAULT_STEPS["astro"] (1000) steps and emb_shen DEFAULT_STEPS["shen"] (2000); the
    option ``steps`` sets both. Checked on what the layer hands each trainer, without training for that long."""
    from ard_sql.build.layers import embed as layer
    from ard_sql.science import shen, specformer

    assert layer.DEFAULT_STEPS == {"astro": 1000, "shen": 2000} and "14:" in layer.RECIPE
    seen: dict[str, int] = {}

    def fake(encoder: str):
        def train(*args, **kw):
            seen[encoder] = kw["steps"]
            return object(), {"steps": kw["steps"], "recipe": {}}
        return train

    monkeypatch.setattr(specformer, "train", fake("astro"))
    monkeypatch.setattr(shen, "train", fake("shen"))
    monkeypatch.setattr(layer, "_fit_astro_head", lambda model, ard_dir, opts: {})
    layer.train_encoders(embed_ard, {"train_min_snr": 0.0})
    assert seen == {"astro": 1000, "shen": 2000}
    layer.train_encoders(embed_ard, {"train_min_snr": 0.0, "steps": 7})
    assert seen == {"astro": 7, "shen": 7}


def test_shen_noise_consistency_term_changes_training_and_is_logged():
    """The noise-consistency term (recipe 13, on by default) changes training and is recorded; ``noise_weight=0``
    turns it off."""
    from ard_sql.science import shen

    torch.set_num_threads(1)
    wave, flux, ivar, z = galaxy_like_spectra(48, seed=3)
    cfg = shen.ShenConfig(embed_dim=16, num_layers=1, num_heads=2)
    kw = {"batch_size": 16, "seed": 0, "device": "cpu", "steps": 4, "z": z}
    default, dlog = shen.train(wave, flux, ivar, cfg, **kw)
    same, _ = shen.train(wave, flux, ivar, cfg, noise_weight=shen.NOISE_WEIGHT, **kw)
    off, olog = shen.train(wave, flux, ivar, cfg, noise_weight=0.0, **kw)
    assert dlog["recipe"]["noise_weight"] == shen.NOISE_WEIGHT > 0 and "noise_weight" not in olog["recipe"]
    torch.testing.assert_close(same.token_embed.weight, default.token_embed.weight, rtol=0, atol=0)
    assert not torch.equal(off.token_embed.weight, default.token_embed.weight)
    assert np.isfinite(shen.embed(default, wave, flux[:4], ivar[:4])).all()


def test_emb_astro_head_is_fitted_on_galaxies_of_every_snr(embed_ard, monkeypatch):
    """The encoders train on spectra above ``train_min_snr``; emb_astro's head is fitted on galaxies of any S/N."""
    from ard_sql.build.layers import embed
    from ard_sql.science import specformer

    con = duckdb.connect(str(paths.db_path(embed_ard)), read_only=True)
    snr = np.array([r[0] for r in con.execute("SELECT SNR_Median FROM ard WHERE SPECTYPE = 'GALAXY'").fetchall()], float)
    con.close()
    cut = float(np.nanmedian(snr))
    fitted: list[int] = []
    real_fit = specformer.fit_embedding_head
    monkeypatch.setattr(specformer, "fit_embedding_head", lambda model, wave, flux, *a, **k: (
        fitted.append(len(flux)), real_fit(model, wave, flux, *a, **k))[1])
    _, _, log = embed.train_encoders(embed_ard, {**TINY, "train_max": 100, "train_min_snr": cut})
    assert log["astro"]["n_train"] == int((snr > cut).sum())
    assert fitted == [len(snr)] and len(snr) > (snr > cut).sum()
    assert log["astro"]["head_sample"] == "GALAXY spectra of every S/N"


def _bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_precision_counts_each_querys_own_kind_among_its_neighbours():
    """bench_embeddings' precision@k and its per-query hits: self left out, NULL vectors never neighbours."""
    be = _bench_module("bench_embeddings")
    rng = np.random.default_rng(0)
    X = rng.normal(0, 1, (40, 8))
    labels = np.array(["field"] * 40, dtype=object)
    labels[:4] = "green_pea"
    X[:3] = [10, 0, 0, 0, 0, 0, 0, 0] + rng.normal(0, 0.1, (3, 8))  # three peas together
    X[3] = -X[0]  # the fourth far from them
    X[4] = X[0] * 1.01  # a field galaxy right among the peas...
    X[5] = np.nan  # ...and a NULL vector, which must not count
    rows, hits = be.query_hits(X, labels, "green_pea", k=3)
    assert list(rows) == [0, 1, 2, 3]
    assert list(hits) == [2, 2, 2, 0]
    assert be.precision_at_k(X, labels, "green_pea", k=3) == pytest.approx(6 / 12)
    assert np.isnan(be.precision_at_k(X, labels, "post_starburst", k=3))
    with pytest.raises(ValueError, match="more than 3"):  # else a query would count itself
        be.query_hits(X[:3], labels[:3], "green_pea", k=3)


def test_bench_quality_by_snr_bins_each_galaxys_neighbours_by_its_own_snr():
    """bench_embeddings' per-S/N neighbour quality: a faint galaxy embedded among the other kind shows in its bin only."""
    be = _bench_module("bench_embeddings")
    rng = np.random.default_rng(1)
    X = np.zeros((24, 4))
    X[:12, 0], X[12:, 1] = 1.0, 1.0
    X += rng.normal(0, 0.01, X.shape)
    truth = pd.DataFrame({"POPULATION": ["quiescent"] * 12 + ["star_forming"] * 12, "Z": [0.1] * 12 + [0.2] * 12})
    snr = np.full(24, 10.0)
    snr[0] = 0.3  # the faint one...
    X[0] = X[12] + rng.normal(0, 0.01, 4)  # ...lands among the other population
    snr[1] = np.nan
    q = be.quality_by_snr({"emb": X}, truth, snr, k=3, bins=(-np.inf, 1.0, np.inf))
    faint, bright = q.loc[("emb", "(-inf, 1]")], q.loc[("emb", "(1, inf]")]
    assert q.loc[("emb", "NaN"), "n"] == 1 and q["n"].sum() == 24
    assert faint["n"] == 1 and faint["own kind in 3"] == 0.0
    assert faint["median dz/(1+z)"] == pytest.approx(0.1 / 1.1)
    assert bright["n"] == 22 and bright["median dz/(1+z)"] == pytest.approx(0.0, abs=1e-12)
    # the star-forming galaxies that have the faint one among their 3 nearest lose a third, no one else anything
    assert 0.8 < bright["own kind in 3"] < 1.0


def test_gpu_pack_round_trip_is_within_a_tenth_of_sigma():
    """bench/gpu_embeddings.py's pack: flux to 0.05 sigma, ivar to 0.5%, bad pixels kept bad."""
    gpu = _bench_module("gpu_embeddings")
    rng = np.random.default_rng(0)
    ivar = 10 ** rng.uniform(-4, 4, (5, 300))
    flux = rng.normal(0, 1, ivar.shape) / np.sqrt(ivar) + rng.uniform(-3, 30, (5, 1)) / np.sqrt(ivar)
    ivar[0, :10] = 0.0
    flux[1, 5] = np.nan
    fq, iq, clipped = gpu.quantise(flux, ivar)
    assert fq.dtype == iq.dtype == np.int16 and clipped == 0
    f2, i2 = gpu.dequantise(fq, iq)
    good = (ivar > 0) & np.isfinite(flux)
    assert np.array_equal(i2 > 0, good) and np.all(f2[~good] == 0)
    assert np.max(np.abs(f2 - flux)[good] * np.sqrt(ivar[good])) < 0.051
    assert np.max(np.abs(i2[good] / ivar[good] - 1)) < 0.0051
    with pytest.raises(ValueError, match="range"):
        gpu.quantise(np.ones((1, 2)), np.array([[1.0, 1e300]]))

