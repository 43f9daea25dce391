"""``ard build``: ingest DESI files, run the layers, write ``ard.duckdb``.

The orchestrator owns everything that is not science: Dask (through
:mod:`ard_sql.build.executor`), progress, fingerprints, atomic writes and the
build report. Layers hold only their science (``build/layers/base.py``).

Steps, each a map over partitions:

1. ingest (when a source is given): scan every coadd/redrock pair, choose each
   target's primary spectrum and the partition order, then write each
   partition's spectra file and core file;
2. each per-partition layer, in the registry's order, on every core partition;
3. global layers (topology) on the whole core at once;
4. compaction: every partition's layers joined once into ``staging/wide``
   (``build/compaction.py``), which the ``ard`` view reads while it is current;
5. ``ard.duckdb`` (views, macros, ``ard_meta``) and ``build-report.json``.

Re-running skips a partition whose fingerprint (its inputs and the layer's
version and options) is recorded as finished in ``state/<layer>.json``.
Partitions that no longer exist in the source are deleted only by a build
that had no error, so a failed rebuild never removes finished data; every
file is written under a temporary name and renamed into place. The one
exception: a layer that fails on a partition whose core was rewritten since
the layer last wrote it (by the core fingerprint recorded in
``state/<layer>.core.json``) loses that partition's file and its wide file, so
its columns read NULL there rather than values computed from the old core
(another Z, other targets).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ard_sql import contract, paths
from ard_sql.build import compaction, database, hats_writer
from ard_sql.build.executor import Executor
from ard_sql.build.ingest import core as ingest
from ard_sql.build.ingest import desi_io
from ard_sql.build.layers import LAYERS, LayerNotAvailable, available_layers, load_layer_class
from ard_sql.build.layers.base import Partition
from ard_sql.build.options import BuildOptions
from ard_sql.build.report import BadInput, BuildReport, Problem


class BuildFailed(RuntimeError):
    """The build could not start or finish (the message says why); finished data is left as it was."""


#: ``report.layers[name]["status"]`` of a layer that raised as a whole (its prepare or its run).
FAILED = "failed"


# ---------------------------------------------------------------- state (finished partitions)
def read_state(ard_dir: Path | str, layer: str) -> dict[str, str]:
    """``{"<order>/<pixel>": fingerprint}`` of the finished partitions of a layer."""
    path = paths.state_file(ard_dir, layer)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # an unreadable state only costs a rebuild


def write_state(ard_dir: Path | str, layer: str, state: dict[str, str]) -> None:
    """Write a layer's state file atomically."""
    path = paths.state_file(ard_dir, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.temporary_sibling(path)
    tmp.write_text(json.dumps(state, indent=0, sort_keys=True))
    os.replace(tmp, path)


def partition_key(order: int, pixel: int) -> str:
    """A partition's key in the state files: ``"<order>/<pixel>"``."""
    return f"{int(order)}/{int(pixel)}"


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- tasks (run on workers)
def ingest_task(ard_dir: str, part: ingest.PartitionInput) -> tuple[int, list[Problem]]:
    """Worker side of the ingest of one partition."""
    return ingest.ingest_partition(ard_dir, part)


def layer_task(ard_dir: str, layer_name: str, order: int, pixel: int, options: dict[str, Any]) -> int:
    """Worker side of one per-partition layer: read the core partition, run the layer, write its file."""
    core = pq.read_table(paths.partition_file(ard_dir, order, pixel))
    layer = load_layer_class(layer_name)()
    part = Partition(Path(ard_dir), order, pixel, core, dict(options))
    table = layer.run(part)
    if table.num_rows != core.num_rows:
        raise ValueError(f"layer {layer_name} returned {table.num_rows} rows for {core.num_rows} core rows")
    # the core's positions are attached by row: the rows must be the core's, in its order
    if not np.array_equal(table.column("TargetID").to_numpy(), core.column("TargetID").to_numpy()):
        raise ValueError(f"layer {layer_name} returned its rows in another order than the core's (or other TargetIDs)")
    where = f"layer {layer_name}, pixel {pixel} (order {order})"
    conformed = hats_writer.conform_table(table, layer_name, where)
    ra, dec = core.column("RA").to_numpy(), core.column("DEC").to_numpy()
    hats_writer.write_partition(ard_dir, layer_name, order, pixel, hats_writer.with_positions(conformed, layer_name, ra, dec))
    return table.num_rows


def _built_on(layer: str) -> str:
    """Name of the state that records, per partition, the core fingerprint a layer's file was computed from."""
    return f"{layer}.core"


def read_built_on(ard_dir: Path | str, layer: str) -> dict[str, str]:
    """``{"<order>/<pixel>": core fingerprint}`` that each of a layer's partition files was computed from."""
    return read_state(ard_dir, _built_on(layer))


def computed_from_another_core(ard_dir: Path | str, layer: str, order: int, pixel: int, built_on: dict[str, str],
                               core_state: dict[str, str]) -> bool:
    """Whether a layer's partition file exists and was computed from a core whose inputs have changed since.

    Exact: compares the core fingerprint recorded when the layer wrote the file (``built_on``, from
    :func:`read_built_on`) with today's (``core_state``). A file with no record (an ARD built before it
    was kept) counts as current, as it always did.
    """
    used = built_on.get(partition_key(order, pixel))
    return (used is not None and used != core_state.get(partition_key(order, pixel))
            and paths.partition_file(ard_dir, order, pixel, layer).exists())


def drop_layer_partition(ard_dir: Path, layer: str, order: int, pixel: int) -> None:
    """Delete a layer's partition file, its model spectra and the wide file built from it (NULL there)."""
    paths.partition_file(ard_dir, order, pixel, layer).unlink(missing_ok=True)
    paths.model_file(ard_dir, layer, order, pixel).unlink(missing_ok=True)  # plot_spectrum would draw the old fit
    # the wide file would still show the dropped values, and a missing layer file never makes it stale
    paths.partition_file(ard_dir, order, pixel, compaction.WIDE).unlink(missing_ok=True)


def compact_task(ard_dir: str, order: int, pixel: int) -> int:
    """Worker side of the compaction of one partition."""
    return compaction.compact_partition(ard_dir, order, pixel)


def run_compaction(opts: BuildOptions, ex: Executor, report: BuildReport) -> None:
    """Write the wide (compacted) file of every partition whose layers changed since it was written."""
    ard_dir = Path(opts.out)
    parts = [(o, p) for o, p, _ in hats_writer.partition_files(ard_dir, paths.CORE)]
    todo = [(o, p) for o, p in parts if opts.force or not compaction.partition_is_current(ard_dir, o, p)]
    outcomes = ex.map(compact_task, todo, lambda op: (str(ard_dir), op[0], op[1]), f"compact {len(todo)} partitions", opts.progress)
    failed = 0
    for out in outcomes:
        if out.error:
            failed += 1
            o, p = out.item
            # a stale wide file would hide the layers' new rows: without it the views join the layers
            paths.partition_file(ard_dir, o, p, compaction.WIDE).unlink(missing_ok=True)
            report.add([Problem(out.error, layer=compaction.WIDE, pixel=p, order=o, severity="warning")])
    hats_writer.finalize_catalog(ard_dir, compaction.WIDE)
    report.layers[compaction.WIDE] = {"partitions": len(parts), "built": len(todo) - failed, "failed": failed,
                                      "skipped_unchanged": len(parts) - len(todo)}


def scan_task(group: desi_io.SourceGroup, rank: int, source: str) -> tuple[pa.Table | None, list[Problem]]:
    """Worker side of the scan of one coadd/redrock pair."""
    return ingest.scan_one(group, rank, source)


# ---------------------------------------------------------------- steps
def _existing_order(ard_dir: Path) -> int | None:
    files = hats_writer.partition_files(ard_dir, paths.CORE)
    return files[0][0] if files else None


def run_ingest(opts: BuildOptions, ex: Executor, report: BuildReport) -> None:
    """Scan the source, plan partitions, ingest the changed ones."""
    ard_dir = Path(opts.out)
    source = Path(opts.source).resolve()
    groups, problems = desi_io.discover(source)
    report.add(problems)
    if not groups:
        raise BuildFailed(f"no coadd/redrock file pairs found under {source}")
    scans = ex.map(scan_task, list(enumerate(groups)), lambda ig: (ig[1], ig[0], str(source)),
                   f"scan {len(groups)} source files", opts.progress)
    tables: list[pa.Table | None] = []
    target_errors: list[Problem] = []  # targets a readable file could not give (left out of this build)
    for out in scans:
        if out.error:
            report.add([Problem(out.error, file=str(out.item[1].coadd))])
            tables.append(None)
            continue
        table, probs = out.result
        report.add(probs)
        target_errors += [p for p in probs if p.target is not None and p.severity == "error"]
        tables.append(table)
    try:
        zcat = ingest.zcatalog(opts.zcat)
    except BadInput as exc:
        raise BuildFailed(str(exc)) from exc
    order = opts.order if opts.order is not None else _existing_order(ard_dir)
    plan = ingest.make_plan(source, groups, tables, order=order, zcat=zcat, max_rows=opts.max_rows)
    report.add(plan.problems)
    if plan.rows.num_rows == 0:
        raise BuildFailed(f"no target could be read from {source}; see the problems above")
    _check_order_change(ard_dir, plan.order)
    state = {} if opts.force else read_state(ard_dir, paths.CORE)
    parts = [plan.partition(p) for p in plan.pixels()]
    prints = {p.pixel: p.fingerprint() for p in parts}
    todo = [p for p in parts if state.get(partition_key(p.order, p.pixel)) != prints[p.pixel]
            or not paths.partition_file(ard_dir, p.order, p.pixel).exists()]
    # A finished partition that holds rows of a source file that cannot be read now is kept as it
    # is: rebuilding it would drop that file's rows (a failed rebuild never damages a finished ARD).
    unreadable = {str(g.coadd) for g, t in zip(groups, tables) if t is None}
    unreadable |= {_coadd_of(p.file) for p in problems if p.file}
    # so is one that holds a target its file cannot give now, or one of a TargetID two files claim
    # (rebuilding would drop the row, or put the ID in two partitions)
    unreadable |= {_coadd_of(p.file) for p in target_errors if p.file} | plan.conflicted
    # ...but only while it holds a target this plan cannot give it
    kept = ingest.partitions_using(ard_dir, source, unreadable,
                                   {(p.order, p.pixel): p.rows.column("TARGETID").to_numpy() for p in parts})
    for p in [p for p in todo if (p.order, p.pixel) in kept]:
        report.add([Problem("partition kept as previously built: one of its source files cannot be read now, "
                            "or cannot give every target it gave before",
                            pixel=p.pixel, order=p.order, severity="warning")])
    # A finished partition whose every target came from files that cannot be read now is in no partition of
    # this plan: it stays too (a build with errors removes nothing), and the report says so.
    orphans = sorted(kept - {(p.order, p.pixel) for p in parts})
    for o, px in orphans:
        report.add([Problem("partition kept as previously built: its source files cannot be read now",
                            pixel=px, order=o, severity="warning")])
    todo = [p for p in todo if (p.order, p.pixel) not in kept]
    outcomes = ex.map(ingest_task, todo, lambda p: (str(ard_dir), p), f"ingest {len(todo)} partitions", opts.progress)
    still_there = {partition_key(p.order, p.pixel) for p in parts} | {partition_key(o, p) for o, p in kept}
    new_state = {k: v for k, v in state.items() if k in still_there}
    kept_at_read = left_out = failed = 0
    for out in outcomes:
        p = out.item
        if out.error:
            report.add([Problem(out.error, pixel=p.pixel, order=p.order)])
            failed += 1
            continue
        n_rows, probs = out.result
        report.add(probs)
        if n_rows == ingest.KEPT:  # a coadd failed at read time: the old partition and its state stand
            kept_at_read += 1
            continue
        missing = p.rows.num_rows - n_rows  # targets of a coadd that could not be read (named in its problem)
        left_out += missing
        if not missing:  # a partition short of targets is not finished: the next build tries its files again
            new_state[partition_key(p.order, p.pixel)] = prints[p.pixel]
    n_kept = len(kept & {(p.order, p.pixel) for p in parts if state.get(partition_key(p.order, p.pixel)) != prints[p.pixel]})
    summary = {"targets": 0, "order": plan.order, "partitions": len(parts) + len(orphans),
               "built": len(todo) - kept_at_read - failed, "failed": failed, "skipped_unchanged": len(parts) - len(todo) - n_kept,
               "kept_unreadable_source": n_kept + kept_at_read + len(orphans), "files": len(plan.files)}
    if left_out:
        summary["targets_left_out"] = left_out
    report.layers[paths.CORE] = summary
    if not report.errors:
        keep = {(p.order, p.pixel) for p in parts}
        for f in hats_writer.remove_partitions(ard_dir, paths.CORE, keep):
            o, px = hats_writer.partition_of(f)  # its spectra go with the core rows that point into them
            paths.spectra_file(ard_dir, o, px).unlink(missing_ok=True)
        for layer in (*LAYERS, compaction.WIDE):
            if hats_writer.remove_partitions(ard_dir, layer, keep):
                # a layer not run in this build keeps HATS catalog files naming what was just removed
                hats_writer.finalize_catalog(ard_dir, layer)
    write_state(ard_dir, paths.CORE, new_state)
    # what the ARD holds (kept partitions included), not what this build could read
    summary["targets"] = hats_writer.finalize_catalog(ard_dir, paths.CORE)


def _coadd_of(path: str) -> str:
    """The coadd file a source file belongs to (itself for a coadd; coadd-<key> beside a redrock/zbest)."""
    p = Path(path)
    for prefix in ("redrock-", "zbest-"):
        if p.name.startswith(prefix):
            return str(p.with_name("coadd-" + p.name[len(prefix):]))
    return str(p)


def _check_order_change(ard_dir: Path, order: int) -> None:
    existing = _existing_order(ard_dir)
    if existing is not None and existing != order:
        raise BuildFailed(
            f"{ard_dir} is partitioned at order {existing}, this build asks for order {order}; "
            "build into a new folder (or pass --order to match)"
        )


def run_layer(opts: BuildOptions, ex: Executor, report: BuildReport, name: str) -> str:
    """Run one per-partition or global layer on every core partition that needs it; return its version."""
    ard_dir = Path(opts.out)
    cls = load_layer_class(name)
    version = str(getattr(cls, "version", "0"))
    options = opts.layer_options.get(name, {})
    core_state = read_state(ard_dir, paths.CORE)
    state = {} if opts.force else read_state(ard_dir, name)
    parts = [(o, p) for o, p, _ in hats_writer.partition_files(ard_dir, paths.CORE)]
    hats_writer.write_schema_file(ard_dir, name)
    if hasattr(cls, "run_global"):
        return _run_global(opts, report, name, cls, version, options, core_state, state, parts)
    # Survey-wide preparation (e.g. training an encoder) runs once, here; its token
    # (a hash of what it made) is part of every partition's fingerprint.
    token = cls().prepare(ard_dir, dict(options), opts.force) if hasattr(cls, "prepare") else ""
    # Options that change how, not what (a cache folder, worker counts) stay out of the fingerprint.
    semantic = {k: v for k, v in options.items() if k not in getattr(cls, "fingerprint_exempt", ())}
    prints = {partition_key(o, p): _hash(version, semantic, token, core_state.get(partition_key(o, p), "")) for o, p in parts}
    todo = [(o, p) for o, p in parts if state.get(partition_key(o, p)) != prints[partition_key(o, p)]
            or not paths.partition_file(ard_dir, o, p, name).exists()]
    outcomes = ex.map(layer_task, todo, lambda op: (str(ard_dir), name, op[0], op[1], options),
                      f"{name}: {len(todo)} partitions", opts.progress)
    new_state = {k: v for k, v in state.items() if k in prints}
    built_on = read_built_on(ard_dir, name)
    failed = 0
    for out in outcomes:
        o, p = out.item
        key = partition_key(o, p)
        if out.error:
            failed += 1
            reason = out.error
            if computed_from_another_core(ard_dir, name, o, p, built_on, core_state):
                # its old values describe the old core (another Z, other targets): NULL is honest, the next build retries
                drop_layer_partition(ard_dir, name, o, p)
                reason += "; its values from the partition's earlier core were removed (NULL until a build succeeds)"
            report.add([Problem(reason, layer=name, pixel=p, order=o)])
        else:
            new_state[key] = prints[key]
            built_on[key] = core_state.get(key, "")
    write_state(ard_dir, name, new_state)
    write_state(ard_dir, _built_on(name), {k: v for k, v in built_on.items() if k in prints})
    hats_writer.finalize_catalog(ard_dir, name)
    report.layers[name] = {"version": version, "partitions": len(parts), "built": len(todo) - failed,
                           "failed": failed, "skipped_unchanged": len(parts) - len(todo)}
    return version


def _run_global(opts: BuildOptions, report: BuildReport, name: str, cls: type, version: str,
                options: dict[str, Any], core_state: dict[str, str], state: dict[str, str],
                parts: list[tuple[int, int]]) -> str:
    """Run a global layer on the whole core and replace all its partitions and artifacts together.

    Nothing of the layer's finished data changes until the whole run is known
    good: the layer's table for every pixel is checked (present, one row per
    core row in core order) and conformed in memory, every partition is then
    written under a hidden staging folder of the ARD, followed by the layer's
    artifacts (optional hook ``stage_artifacts(ard_dir, staging) -> [(staged,
    final), ...]``), and only then is each staged file renamed onto its final
    path, partitions first and artifacts last. Any failure before the renames
    leaves the previous partitions, artifacts and state as they were, and the
    report names the layer. The state is cleared before the renames, so an
    interrupted rename is rebuilt by the next build, never taken as finished.
    """
    import shutil
    import tempfile

    import numpy as np

    ard_dir = Path(opts.out)
    fingerprint = _hash(version, options, sorted(core_state.items()))
    complete = all(paths.partition_file(ard_dir, o, p, name).exists() for o, p in parts)
    if state.get("*") == fingerprint and complete:
        report.layers[name] = {"version": version, "partitions": len(parts), "built": 0, "skipped_unchanged": len(parts)}
        return version
    columns = ["TargetID", "RA", "DEC", "Z", *getattr(cls, "core_columns", ())]
    tables = []
    for o, p in parts:
        t = pq.read_table(paths.partition_file(ard_dir, o, p), columns=columns)
        tables.append(t.append_column("Npix", pa.array([p] * t.num_rows, pa.int64())))
    core = pa.concat_tables(tables) if tables else None
    staging: Path | None = None
    try:
        try:
            layer = cls()
            result = layer.run_global(ard_dir, core, dict(options))
            ready: dict[tuple[int, int], pa.Table] = {}
            for (o, p), core_part in zip(parts, tables):
                where = f"layer {name}, pixel {p} (order {o})"
                table = result.get(p)
                if table is None:
                    raise ValueError(f"{where}: returned no table")
                if table.num_rows != core_part.num_rows:
                    raise ValueError(f"{where}: returned {table.num_rows} rows for {core_part.num_rows} core rows")
                conformed = hats_writer.conform_table(table, name, where)
                if not np.array_equal(conformed.column("TargetID").to_numpy(zero_copy_only=False),
                                      core_part.column("TargetID").to_numpy(zero_copy_only=False)):
                    raise ValueError(f"{where}: TargetID differs from the core partition's (order or rows)")
                ready[(o, p)] = hats_writer.with_positions(conformed, name, core_part.column("RA").to_numpy(),
                                                           core_part.column("DEC").to_numpy())
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-staging-", dir=ard_dir))
            moves: list[tuple[Path, Path]] = []
            for (o, p), table in ready.items():
                staged = hats_writer.write_partition(staging, name, o, p, table)
                moves.append((staged, paths.partition_file(ard_dir, o, p, name)))
            stage = getattr(layer, "stage_artifacts", None)
            if stage is not None:
                moves.extend(stage(ard_dir, staging / "artifacts"))
        except Exception as exc:  # noqa: BLE001 - the report names the layer and the reason
            report.add([Problem(f"{type(exc).__name__}: {exc}; the previous partitions and artifacts are kept",
                                layer=name)])
            report.layers[name] = {"version": version, "partitions": len(parts), "built": 0, "failed": len(parts)}
            return version
        write_state(ard_dir, name, {})
        try:
            for staged, final in moves:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
        except OSError as exc:
            report.add([Problem(f"moving the staged files into place failed ({type(exc).__name__}: {exc}); "
                                "the layer's state is cleared so the next build rebuilds it", layer=name)])
            report.layers[name] = {"version": version, "partitions": len(parts), "built": 0, "failed": len(parts)}
            return version
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    write_state(ard_dir, name, {"*": fingerprint})
    write_state(ard_dir, _built_on(name), {partition_key(o, p): core_state.get(partition_key(o, p), "") for o, p in parts})
    hats_writer.finalize_catalog(ard_dir, name)
    report.layers[name] = {"version": version, "partitions": len(parts), "built": len(parts), "skipped_unchanged": 0}
    return version


def layers_to_run(opts: BuildOptions, report: BuildReport) -> list[str]:
    """The layers this build runs: those asked for, or every available one."""
    if opts.layers is not None:
        for name in opts.layers:
            try:
                load_layer_class(name)
            except LayerNotAvailable as exc:
                raise BuildFailed(str(exc)) from exc
        return list(opts.layers)
    return available_layers()


def check_layer_options(opts: BuildOptions, layers: list[str]) -> None:
    """Every layer option given (``--set``, a config), checked by its layer's ``check_options`` before any work.

    Options of a layer this build does not run (not in ``--layers``) are
    checked too: a typo there is as wrong as anywhere, and would otherwise pass
    silently now and fail the build that runs the layer. An unknown layer
    name, or options for a layer that cannot be imported here (so cannot be
    checked), stop the build as well. ``layers`` (the layers this build runs)
    only orders the checks. A bad value would otherwise fail only when the
    layer reaches its first partition, after ingest and every earlier layer,
    and once per partition.
    """
    named = [n for n in layers if n in opts.layer_options] + [n for n in opts.layer_options if n not in layers]
    for name in named:
        given = opts.layer_options[name]
        if name not in LAYERS:
            raise BuildFailed(f"layer options: unknown layer {name!r}; registered layers: {', '.join(LAYERS)}")
        if not isinstance(given, dict):
            raise BuildFailed(f"layer options: {name}: expected a mapping of option names to values, got {given!r}")
        if not given:
            continue
        try:
            cls = load_layer_class(name)
        except LayerNotAvailable as exc:
            raise BuildFailed(f"layer options for {name} cannot be checked: {exc}") from None
        check = getattr(cls, "check_options", None)
        if check is not None:
            try:
                check(dict(given))
            except (ValueError, TypeError) as exc:
                raise BuildFailed(f"layer options: {exc}") from None


def build(opts: BuildOptions) -> BuildReport:
    """Run a whole build as ``opts`` says; return the report (also written to ``build-report.json``).

    Raises :class:`BuildFailed` when nothing could be built at all (no
    source files, no readable target, an ARD with no core and no source).
    A layer that raises is a problem of the report (``report.layers[name]
    ["status"] == FAILED``): its previous data, state and version stay, the
    later layers run and ``ard.duckdb`` and the report are written.
    """
    ard_dir = Path(opts.out).resolve()
    opts.out = str(ard_dir)
    report = BuildReport(started=_now(), source=str(opts.source or ""))
    layers = layers_to_run(opts, report)
    check_layer_options(opts, layers)
    if not opts.source and not hats_writer.partition_files(ard_dir, paths.CORE):
        # before anything is started or created: no cluster, no empty folder left behind
        raise BuildFailed(f"{ard_dir} has no core table yet: give a SOURCE folder of DESI files to ingest")
    ard_dir.mkdir(parents=True, exist_ok=True)
    previous = database.read_provenance(ard_dir)
    prov = previous or database.Provenance()
    with Executor(opts.scheduler, opts.n_workers) as ex:
        if opts.source:
            run_ingest(opts, ex, report)
            prov.source = str(Path(opts.source).resolve())
        for name in layers:
            try:
                prov.layer_versions[name] = run_layer(opts, ex, report, name)
            except Exception as exc:  # noqa: BLE001 - one broken layer must not lose the report, the database or later layers
                reason = f"layer failed ({type(exc).__name__}: {exc}); its previous data and state are kept"
                core_state, built_on = read_state(ard_dir, paths.CORE), read_built_on(ard_dir, name)
                older = sum(computed_from_another_core(ard_dir, name, o, p, built_on, core_state)
                            for o, p, _ in hats_writer.partition_files(ard_dir, paths.CORE))
                if older:  # kept whole (its index and artifacts match them), but say which values are out of date
                    reason += f" ({older} partition(s) of them were computed from an earlier core)"
                report.add([Problem(reason, layer=name)])
                report.layers[name] = {"status": FAILED, "error": reason}
                continue
            finalize = getattr(load_layer_class(name), "finalize", None)
            if finalize is not None:  # layer-wide products (indexes) and figures (agreement) for ard_meta
                try:
                    prov.extra.update(finalize(ard_dir, dict(opts.layer_options.get(name, {}))))
                except Exception as exc:  # noqa: BLE001 - named in the report, the rest of the ARD stands
                    report.add([Problem(f"finalize failed: {type(exc).__name__}: {exc}", layer=name)])
        run_compaction(opts, ex, report)
    prov.build_date = _now()
    prov.options = opts.to_dict()
    problems = database.write_database(ard_dir, prov)
    report.add(Problem(p, layer="database", severity="warning") for p in problems)
    report.finished = _now()
    report.write(ard_dir)
    return report


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


__all__ = ["BuildFailed", "FAILED", "build", "read_state", "write_state", "run_ingest", "run_layer", "layers_to_run"]
