"""Run one function over many items on Dask, with a progress bar, never losing an error.

The build maps over partitions (and over source files). Where the work runs
is chosen by ``BuildOptions.scheduler``:

``processes`` (default)
    a ``dask.distributed.LocalCluster`` of ``workers`` single-threaded
    processes (one BLAS thread each: distributed sets ``OMP_NUM_THREADS=1``);
``threads``
    the same cluster with threads instead of processes;
``sync``
    in this process, one item after another (debugging, tests);
an address (``tcp://host:8786``)
    an existing ``dask.distributed`` scheduler, e.g. one started by
    ``dask-jobqueue`` on a SLURM cluster; its workers need ``ard_sql`` installed.

An item whose function raises does not stop the others: :func:`run_tasks`
returns the exception text for it, and the caller turns it into a report
entry naming the layer, the partition and the reason.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOCAL_KINDS = ("processes", "threads", "sync")


@dataclass
class Outcome:
    """What one task gave: its result, or the error that stopped it."""

    item: Any
    result: Any = None
    error: str | None = None


@contextlib.contextmanager
def _parent_environ_kept() -> Iterator[None]:
    """Undo, in this process, the variables a Dask nanny sets for its worker (``pre-spawn-environ``).

    A ``LocalCluster``'s nannies live in this process and write e.g.
    ``OMP_NUM_THREADS=1`` into its environment before spawning a worker; torch
    imported afterwards would then run the main process's own work (the
    embed layer's training) on one thread of the machine's cores.
    """
    import dask

    keys = set(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}) | {
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"}
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def call_captured(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """Call ``fn(*args)``; return (True, result) or (False, "ExcType: message" + last frame)."""
    try:
        return True, fn(*args)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a report entry
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
        return False, f"{type(exc).__name__}: {exc}{where}"


class Executor:
    """A Dask client (or none, for ``sync``) that maps functions over items."""

    def __init__(self, scheduler: str | None = "processes", workers: int = 1) -> None:
        self.kind = scheduler or "processes"
        self.workers = max(1, int(workers))
        self.client = None
        self._cluster = None

    def __enter__(self) -> "Executor":
        if self.kind == "sync":
            return self
        from dask.distributed import Client, LocalCluster

        if self.kind in ("processes", "threads"):
            with _parent_environ_kept():
                self._cluster = LocalCluster(
                    n_workers=self.workers, threads_per_worker=1, processes=self.kind == "processes",
                    dashboard_address=None, silence_logs=40,
                )
            self.client = Client(self._cluster)
        else:
            try:
                self.client = Client(self.kind, timeout=30)
            except OSError as exc:
                raise ConnectionError(f"cannot reach the dask scheduler at {self.kind}: {exc}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        with _parent_environ_kept():  # a nanny that restarted a worker set them again
            if self.client is not None:
                self.client.close()
            if self._cluster is not None:
                self._cluster.close()

    def map(self, fn: Callable[..., Any], items: Sequence[Any], args: Callable[[Any], tuple], label: str,
            progress: bool = True) -> list[Outcome]:
        """Run ``fn(*args(item))`` for every item; outcomes in the order of ``items``."""
        outcomes = [Outcome(item) for item in items]
        if not items:
            return outcomes
        with _bar(label, len(items), progress) as advance:
            if self.client is None:
                for out in outcomes:
                    ok, value = call_captured(fn, *args(out.item))
                    _store(out, ok, value)
                    advance()
            else:
                from dask.distributed import as_completed

                futures = {self.client.submit(call_captured, fn, *args(out.item), pure=False): out for out in outcomes}
                for fut in as_completed(futures):
                    out = futures[fut]
                    try:
                        ok, value = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a worker died or the result could not travel
                        ok, value = False, f"{type(exc).__name__}: {exc}"
                    _store(out, ok, value)
                    advance()
        return outcomes


def _store(out: Outcome, ok: bool, value: Any) -> None:
    if ok:
        out.result = value
    else:
        out.error = value


@contextlib.contextmanager
def _bar(label: str, total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
