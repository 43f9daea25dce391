"""``ard daemon``: long-running work on a built ARD; ``ard daemon bagpipes`` fits galaxies with Bagpipes.

A Bagpipes nested-sampling fit takes minutes per galaxy, so the fits run in
the background, after the build, while the ARD is in use:

* a priority queue of every GALAXY target without a finished fit: BGS and
  LRG targets first, then the rest; highest ``SNR_Median`` first within each;
* ``--workers`` processes, one fit each (``ard_sql.science.pipes_fit``);
* a checkpoint every ``--batch`` finished fits (or ``--checkpoint-seconds``):
  per partition, the fit rows (``paths.bagpipes_fits_file``), 200 posterior
  draws per target (``paths.bagpipes_draws_file``), the best-fit model spectra
  (``models/bagpipes/``), then the ``bagpipes`` staging partition rewritten
  with the fits merged over the amortized rows (the layer's own merge), each
  file atomically, so a reader sees new rows at its next query;
* killed at any moment, it resumes where it stopped: the targets in the fit
  files are done, everything else is queued again (at most one batch of fits
  is redone); SIGTERM/Ctrl-C finishes the running fits' checkpoint first;
* every fit row carries the model's key (``pipes_model.model_key``); a fit made
  under another model (priors, fixed physics, bagpipes version) is stale: it
  is not merged and the daemon fits the target again;
* one daemon per ARD (a lock file); ``ard daemon status`` reports progress.
"""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures.process  # noqa: F401  (BrokenProcessPool)
import contextlib
import datetime as _dt
import fcntl
import importlib
import json
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from ard_sql import paths
from ard_sql.commands._common import console, fail

if TYPE_CHECKING:  # pipes_fit imports bagpipes: only the worker processes pay for it
    from ard_sql.science.pipes_fit import FitResult

PRIORITY_CLASSES = ("BGS", "LRG")
STATUS_FILE, LOCK_FILE = "daemon.json", "daemon.lock"
DEFAULT_FITTER = "ard_sql.science.pipes_fit:fit_galaxy"

daemon_app = typer.Typer(help="Background work on a built ARD (Bagpipes fits).", no_args_is_help=True, rich_markup_mode=None)


# ---------------------------------------------------------------- queue
@dataclass(frozen=True)
class Job:
    """One galaxy to fit."""

    targetid: int
    order: int
    pixel: int
    z: float
    veldisp: float | None
    target_class: str
    snr: float


def _done_targets(ard_dir: Path, order: int, pixel: int) -> set[int]:
    """Targets with a fit made with the current model (stale fits are fitted again)."""
    from ard_sql.build.layers.bagpipes import current_fits

    path = paths.bagpipes_fits_file(ard_dir, order, pixel)
    if not path.exists():
        return set()
    return set(current_fits(pq.read_table(path)).column("TargetID").to_pylist())


def _veldisp(ard_dir: Path, order: int, pixel: int) -> dict[int, float]:
    """pPXF stellar velocity dispersions of a partition, when the ppxf layer has run."""
    path = paths.partition_file(ard_dir, order, pixel, "ppxf")
    if not path.exists():
        return {}
    t = pq.read_table(path, columns=["TargetID", "VelDisp"])
    out = {}
    for tid, v in zip(t.column("TargetID").to_pylist(), t.column("VelDisp").to_pylist()):
        if v is not None and np.isfinite(v) and v > 0:
            out[int(tid)] = float(v)
    return out


def build_queue(ard_dir: Path | str) -> list[Job]:
    """Every GALAXY target without a finished fit, in fitting order (BGS/LRG first, then S/N)."""
    from ard_sql.build import hats_writer
    from ard_sql.build.layers.bagpipes import galaxy_mask

    ard_dir = Path(ard_dir)
    jobs: list[Job] = []
    for order, pixel, f in hats_writer.partition_files(ard_dir, paths.CORE):
        core = pq.read_table(f, columns=["TargetID", "SPECTYPE", "TARGET_CLASS", "SNR_Median", "Z"])
        gal = galaxy_mask(core)
        done = _done_targets(ard_dir, order, pixel)
        vd = _veldisp(ard_dir, order, pixel)
        tcls = core.column("TARGET_CLASS").fill_null("").to_pylist()
        snr = core.column("SNR_Median").fill_null(0.0).to_numpy()
        z = core.column("Z").to_numpy(zero_copy_only=False).astype(float)
        for i, tid in enumerate(core.column("TargetID").to_pylist()):
            if gal[i] and tid not in done:
                jobs.append(Job(int(tid), order, pixel, float(z[i]), vd.get(int(tid)), str(tcls[i]), float(snr[i])))
    jobs.sort(key=lambda j: (j.target_class not in PRIORITY_CLASSES, -j.snr, j.targetid))
    return jobs


# ---------------------------------------------------------------- workers
def _resolve(fitter: str) -> Callable:
    module, _, name = fitter.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_init(daemon_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    try:  # Linux: die with the daemon (kill -9 of the daemon must not leave fits running)
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != daemon_pid:  # the daemon died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


def fit_job(job: Job, flux: np.ndarray, ivar: np.ndarray, workdir: str, config: Any, fitter: str) -> FitResult:
    """Worker side: one fit; any exception becomes a NULL row with FIT_FAILED."""
    from ard_sql.science.pipes_fit import FLAGS, FitResult, null_row

    t0 = time.perf_counter()
    try:
        return _resolve(fitter)(job.targetid, job.z, flux, ivar, veldisp=job.veldisp, workdir=workdir, config=config)
    except Exception as exc:  # noqa: BLE001 - a failed fit is a flagged NULL row, never a dead daemon
        return FitResult(job.targetid, null_row(job.targetid, FLAGS["FIT_FAILED"]), runtime_s=time.perf_counter() - t0,
                         message=f"target {job.targetid}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- checkpoint
def _atomic_parquet(table: pa.Table, path: Path) -> None:
    with paths.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _append(path: Path, new: pa.Table) -> pa.Table:
    """Existing rows of ``path`` minus the targets in ``new``, plus ``new`` (written atomically)."""
    import pyarrow.compute as pc

    if path.exists():
        old = pq.read_table(path)
        keep = pc.invert(pc.is_in(old.column("TargetID"), value_set=pa.array(np.unique(new.column("TargetID")))))
        old = old.filter(keep)
        for field in new.schema:  # a file from an older version may lack a column (e.g. Model_Key): NULL there
            if field.name not in old.column_names:
                old = old.append_column(field, pa.nulls(len(old), field.type))
        new = pa.concat_tables([old.select(new.column_names).cast(new.schema), new])
    _atomic_parquet(new, path)
    return new


def draws_table(results: list) -> pa.Table:
    """Long-format posterior draws: TargetID, Draw, then one float32 column per quantity."""
    from ard_sql.science.pipes_fit import QUANTITIES

    cols: dict[str, list] = {"TargetID": [], "Draw": [], **{q: [] for q in QUANTITIES}}
    for r in results:
        if not r.draws:
            continue
        n = len(r.draws[QUANTITIES[0]])
        cols["TargetID"].append(np.full(n, r.targetid, np.int64))
        cols["Draw"].append(np.arange(n, dtype=np.int16))
        for q in QUANTITIES:
            cols[q].append(np.asarray(r.draws[q], np.float32))
    schema = pa.schema([("TargetID", pa.int64()), ("Draw", pa.int16()), *[(q, pa.float32()) for q in QUANTITIES]])
    if not cols["TargetID"]:
        return schema.empty_table()
    return pa.table({k: np.concatenate(v) for k, v in cols.items()}, schema=schema)


def _write_models(ard_dir: Path, order: int, pixel: int, results: list) -> None:
    import h5py

    from ard_sql import spectra_store

    new = {r.targetid: r.model for r in results if r.model is not None}
    if not new:
        return
    path = paths.model_file(ard_dir, "bagpipes", order, pixel)
    models: dict[int, np.ndarray] = {}
    if path.exists():
        with h5py.File(path, "r") as h5:
            for tid, row in zip(h5["targetid"][...], h5["model"][...]):
                models[int(tid)] = row
    models.update(new)
    tids = np.array(sorted(models), np.int64)
    spectra_store.write_models(ard_dir, "bagpipes", order, pixel, tids, {"model": np.stack([models[t] for t in tids])})


def checkpoint(ard_dir: Path, results: list[tuple[Job, Any]]) -> int:
    """Write finished fits (draws, models, fit rows, staging) partition by partition; return bagpipes rows staged."""
    from ard_sql.build.layers.bagpipes import MODEL_KEY, restage_partition, rows_to_table
    from ard_sql.science.pipes_model import model_key

    by_part: dict[tuple[int, int], list] = {}
    for job, res in results:
        by_part.setdefault((job.order, job.pixel), []).append(res)
    staged = 0
    for (order, pixel), res in sorted(by_part.items()):
        # draws and models first: the fit rows are the record of "done"
        _append(paths.bagpipes_draws_file(ard_dir, order, pixel), draws_table(res))
        _write_models(ard_dir, order, pixel, res)
        rows = rows_to_table([r.row for r in res])
        rows = rows.append_column(MODEL_KEY, pa.array([model_key()] * len(rows), pa.string()))
        _append(paths.bagpipes_fits_file(ard_dir, order, pixel), rows)
        staged += restage_partition(ard_dir, order, pixel)
    return staged


# ---------------------------------------------------------------- status
def status_path(ard_dir: Path | str) -> Path:
    """The daemon's status file (JSON: state, pid, progress) in an ARD's bagpipes artifacts."""
    return paths.artifact_dir(ard_dir, "bagpipes") / STATUS_FILE


def _write_status(ard_dir: Path, info: dict[str, Any]) -> None:
    paths.atomic_write_text(status_path(ard_dir), json.dumps(info, indent=1, default=str))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # EPERM: the process exists but belongs to another user (a shared ARD)
    return True


def daemon_status(ard_dir: Path | str) -> dict[str, Any]:
    """Progress of the Bagpipes daemon of an ARD (fits done, failed, queued, running or not)."""
    ard_dir = Path(ard_dir)
    from ard_sql.build.layers.bagpipes import current_fits

    done = failed = stale = 0
    for f in (paths.artifact_dir(ard_dir, "bagpipes") / "fits").glob("Norder=*/Dir=*/Npix=*.parquet"):
        every = pq.read_table(f)
        t = current_fits(every)
        stale += len(every) - len(t)
        ok = t.column("LogMass_p50").is_valid().to_numpy(zero_copy_only=False)
        done += int(ok.sum())
        failed += int((~ok).sum())
    info: dict[str, Any] = json.loads(status_path(ard_dir).read_text()) if status_path(ard_dir).exists() else {}
    running = bool(info.get("state") == "running" and info.get("pid") and _pid_alive(int(info["pid"])))
    return {"ard_dir": str(ard_dir), "running": running, "fitted": done, "failed": failed, "stale": stale,
            "queued": len(build_queue(ard_dir)), "last_run": info}


# ---------------------------------------------------------------- the daemon
class DaemonBusy(RuntimeError):
    """Another daemon holds the ARD's lock."""


class ModelChanged(RuntimeError):
    """The ARD's amortized rows come from another model than this version's: rebuild the layer first."""


def run_daemon(ard_dir: Path | str, workers: int = 1, max_fits: int | None = None, batch: int | None = None,
               checkpoint_seconds: float = 300.0, config: Any = None, fitter: str = DEFAULT_FITTER,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit queued galaxies until the queue is empty, ``max_fits`` are done, or SIGTERM/SIGINT.

    Returns the final status dictionary (also in ``artifacts/bagpipes/daemon.json``).
    """
    from ard_sql import spectra_store
    from ard_sql.science.pipes_fit import FitConfig

    ard_dir = Path(ard_dir).resolve()
    if not paths.staging_dir(ard_dir, paths.CORE).exists():
        raise FileNotFoundError(f"{ard_dir} has no core table: build the ARD first (ard build SOURCE --out {ard_dir})")
    from ard_sql.build.layers.bagpipes import staged_model_key
    from ard_sql.science.pipes_model import model_key

    staged = staged_model_key(ard_dir)
    if staged is not None and staged != model_key():
        # merging fits of this model into rows of another would mix two models in one table
        raise ModelChanged(f"{ard_dir}: its bagpipes layer was built with another model ({staged or 'unkeyed'}; this "
                           f"version's is {model_key()}): run `ard build --out {ard_dir} --layers bagpipes` first")
    config = config or FitConfig()
    batch = batch or max(2, workers)
    art = paths.artifact_dir(ard_dir, "bagpipes")
    art.mkdir(parents=True, exist_ok=True)
    lock = open(art / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DaemonBusy(f"another Bagpipes daemon is working on {ard_dir} ({status_path(ard_dir)})") from None
    stop = {"now": False}

    def _stop(signum, _frame):
        stop["now"] = True
        log(f"signal {signum}: finishing the running fits, then a checkpoint")

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    from ard_sql.build.layers.bagpipes import restage_partition

    for f in sorted((art / "fits").glob("Norder=*/Dir=*/Npix=*.parquet")):  # repair a kill mid-checkpoint
        order, pixel = int(f.parent.parent.name.split("=")[1]), int(f.stem.split("=")[1])
        if paths.partition_file(ard_dir, order, pixel).exists():
            restage_partition(ard_dir, order, pixel)
    queue = build_queue(ard_dir)
    if max_fits is not None:
        queue = queue[:max_fits]
    info: dict[str, Any] = {"pid": os.getpid(), "state": "running", "started": _now(), "workers": workers,
                            "fitter": fitter, "config": config.__dict__, "queued_at_start": len(queue),
                            "fitted_this_run": 0, "failed_this_run": 0, "checkpoints": 0, "mean_fit_seconds": None,
                            "last_checkpoint": None}
    _write_status(ard_dir, info)
    log(f"bagpipes daemon on {ard_dir}: {len(queue)} galaxies queued, {workers} worker(s)")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # one fit per core; inherited by the spawned workers
    workdir = str(paths.bagpipes_workdir(ard_dir))
    pending: list[tuple[Job, Any]] = []
    runtimes: list[float] = []
    last_ckpt = time.monotonic()

    def _flush() -> None:
        nonlocal pending, last_ckpt
        if pending:
            staged = checkpoint(ard_dir, pending)
            info["checkpoints"] += 1
            info["last_checkpoint"] = _now()
            info["staged_bagpipes_rows"] = staged
            log(f"checkpoint: {len(pending)} fits written ({info['fitted_this_run']} ok, "
                f"{info['failed_this_run']} failed this run)")
            pending = []
        last_ckpt = time.monotonic()
        info["queued"] = len(queue) - next_i + len(running)
        _write_status(ard_dir, info)

    next_i = 0
    running: dict[cf.Future, Job] = {}
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            while True:
                while not stop["now"] and next_i < len(queue) and len(running) < workers:
                    job = queue[next_i]
                    next_i += 1
                    spec = spectra_store.read_partition(ard_dir, job.order, job.pixel, np.array([job.targetid]))
                    fut = pool.submit(fit_job, job, spec.flux[0], spec.ivar[0], workdir, config, fitter)
                    running[fut] = job
                if not running:
                    break
                finished, _ = cf.wait(list(running), timeout=2.0, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    job = running.pop(fut)
                    res = fut.result()
                    pending.append((job, res))
                    runtimes.append(res.runtime_s)
                    ok = res.row.get("LogMass_p50") is not None
                    info["fitted_this_run" if ok else "failed_this_run"] += 1
                    info["mean_fit_seconds"] = round(float(np.mean(runtimes)), 2)
                    if not ok:
                        log(f"fit failed: {res.message}")
                if len(pending) >= batch or (pending and time.monotonic() - last_ckpt > checkpoint_seconds):
                    _flush()
        _flush()
        info["state"] = "stopped" if stop["now"] and next_i < len(queue) else "finished"
    except cf.process.BrokenProcessPool:
        # a worker was killed (OOM killer, kill -9): keep what finished, the rest stays queued
        info["state"] = "worker_died"
        _flush()
        log("a fit worker died (killed or out of memory); finished fits are saved, run again to resume")
    except BaseException:
        info["state"] = "crashed"
        with contextlib.suppress(Exception):
            _flush()  # keep the fits that finished before the error
        raise
    finally:
        info["finished"] = _now()
        _write_status(ard_dir, info)
        for s, h in old.items():
            signal.signal(s, h)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    log(f"bagpipes daemon {info['state']}: {info['fitted_this_run']} fitted, {info['failed_this_run']} failed")
    return info


# ---------------------------------------------------------------- commands
@daemon_app.command("bagpipes", short_help="Fit every galaxy with Bagpipes (nautilus), resumable.")
def bagpipes(
    ard_dir: Path = typer.Argument(..., help="ARD folder (built; the bagpipes layer gives the amortized rows)."),
    workers: int = typer.Option(1, "--workers", help="Fits running at once (one core each)."),
    max_fits: int = typer.Option(None, "--max-fits", help="Stop after this many fits (default: the whole queue)."),
    batch: int = typer.Option(None, "--batch", help="Fits per checkpoint (default: max(2, workers))."),
    checkpoint_seconds: float = typer.Option(300.0, "--checkpoint-seconds", help="Checkpoint at least this often."),
    n_live: int = typer.Option(400, "--n-live", help="Nautilus live points (fewer: faster, coarser posteriors)."),
    n_networks: int = typer.Option(4, "--n-networks", help="Nautilus neural networks per bound."),
    fitter: str = typer.Option(DEFAULT_FITTER, "--fitter", hidden=True, help="module:function doing one fit (tests)."),
) -> None:
    """Fit every galaxy with Bagpipes (nautilus), BGS/LRG and high S/N first; resumable, checkpointed."""
    from ard_sql.science.pipes_fit import FitConfig

    if workers < 1:
        raise fail("--workers must be at least 1")
    try:
        info = run_daemon(ard_dir, workers=workers, max_fits=max_fits, batch=batch, checkpoint_seconds=checkpoint_seconds,
                   config=FitConfig(n_live=n_live, n_networks=n_networks), fitter=fitter,
                   log=lambda m: console.print(m, highlight=False))
    except (DaemonBusy, ModelChanged, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    if info["state"] == "worker_died":
        raise typer.Exit(1)


@daemon_app.command("status", short_help="Progress of the Bagpipes daemon: fitted, failed, queued.")
def status(ard_dir: Path = typer.Argument(..., help="ARD folder."),
           as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """Show the Bagpipes daemon's progress: fitted, failed, queued, running or not."""
    if not paths.staging_dir(ard_dir, paths.CORE).exists():
        raise fail(f"{ard_dir} is not a built ARD (no staging/core)")
    st = daemon_status(ard_dir)
    if as_json:
        print(json.dumps(st, indent=1, default=str))
        return
    last = st["last_run"]
    print(f"bagpipes daemon on {st['ard_dir']}: {'RUNNING' if st['running'] else 'not running'}")
    print(f"  fitted {st['fitted']}, failed {st['failed']}, queued {st['queued']}"
          + (f", stale {st['stale']} (made with another model; queued again)" if st['stale'] else ""))
    if last:
        print(f"  last run: {last.get('state')} (pid {last.get('pid')}, started {last.get('started')}, "
              f"last checkpoint {last.get('last_checkpoint')}, mean fit {last.get('mean_fit_seconds')} s, "
              f"{last.get('workers')} worker(s))")


def register(app: typer.Typer) -> None:
    """Add ``ard daemon`` (bagpipes, status) to the app."""
    app.add_typer(daemon_app, name="daemon")
