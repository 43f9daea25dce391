"""The build on a dask.distributed scheduler with two worker processes equals the in-process build."""

from __future__ import annotations

import os
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ard_sql import paths
from ard_sql.build.options import BuildOptions
from ard_sql.build.orchestrator import build

from conftest import PairSpec, write_pair, write_small_survey

distributed = pytest.importorskip("dask.distributed")


def _core_table(ard) -> pa.Table:
    files = sorted((paths.staging_dir(ard, "core") / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("TargetID")


def _spectra(ard) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for f in sorted((ard / "spectra").rglob("*.h5")):
        with h5py.File(f, "r") as h5:
            out[f.relative_to(ard).as_posix()] = {k: h5[k][...] for k in h5.keys()}
    return out


def test_cluster_build_equals_sync_build(tmp_path):
    root = tmp_path / "survey"
    truth = write_small_survey(root)
    # A few more files, so that several tasks run on each worker.
    for i, hpx in enumerate((21000, 22000, 45000)):
        write_pair(root, "main", "bright", hpx, PairSpec(39627640566180000 + 100 * i + np.arange(5)), seed=20 + i)
    sync = build(BuildOptions(source=str(root), out=str(tmp_path / "sync"), layers=[], scheduler="sync", progress=False))
    assert not sync.errors

    with distributed.LocalCluster(host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=40) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        with distributed.Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            report = build(BuildOptions(source=str(root), out=str(tmp_path / "dist"), layers=[],
                                        scheduler=cluster.scheduler_address, progress=False))
            # Work really ran on the workers (they hold task records of the build).
            done = client.run(lambda dask_worker: len(dask_worker.state.log))
            assert len(done) == 2 and all(v > 0 for v in done.values())
    assert not report.errors, report.errors
    assert report.layers["core"]["partitions"] == sync.layers["core"]["partitions"] >= 3
    assert report.layers["core"]["built"] == sync.layers["core"]["built"]

    a, b = _core_table(tmp_path / "sync"), _core_table(tmp_path / "dist")
    assert a.num_rows == len(truth["targets"]) + 15
    assert a.equals(b)
    sa, sb = _spectra(tmp_path / "sync"), _spectra(tmp_path / "dist")
    assert sa.keys() == sb.keys() and len(sa) == report.layers["core"]["partitions"]
    for name in sa:
        assert sa[name].keys() == sb[name].keys()
        for k in sa[name]:
            np.testing.assert_array_equal(sa[name][k], sb[name][k], err_msg=f"{name}:{k}")


@pytest.mark.slow  # the client retries for its 30 s timeout
def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    root = tmp_path / "survey"
    write_small_survey(root, n_per_pixel=2)
    with pytest.raises(ConnectionError, match="cannot reach the dask scheduler"):
        build(BuildOptions(source=str(root), out=str(tmp_path / "ard"), layers=[],
                           scheduler="tcp://127.0.0.1:1", progress=False))


def test_local_cluster_leaves_this_process_thread_settings_alone(monkeypatch):
    """Dask's nannies write OMP_NUM_THREADS=1 into the parent: the build's own torch work would run on one core."""
    from ard_sql.build.executor import Executor

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "2")
    with Executor("processes", workers=1) as ex:
        # a lambda, not os.environ.get: that bound method would carry this process's mapping along
        assert ex.client.submit(lambda: os.environ.get("OMP_NUM_THREADS")).result() == "1"
        assert "OMP_NUM_THREADS" not in os.environ
        assert os.environ["MKL_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in os.environ
