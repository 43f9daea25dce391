"""Issue 10: the query side at DR1 scale on one small machine.

Builds (once) a catalog-only ARD with ``ard synth-catalog`` and measures, in one process:

* the blueprint's void query through ``db.query`` (warm, best of 3) and the bytes DuckDB
  reads for it against the whole table's size on disk (column pruning: the embedding
  columns must not be read);
* a 1-degree cone: ``db.query("cone(...)")`` (partition pruning) against the same
  predicate on the ``ard`` view (every partition), time and bytes read, and the ratio;
* peak resident memory of the process (``ru_maxrss``).

Usage::

    python3 bench/bench_scale.py --ard /tmp/scale10m --n 10000000
"""

from __future__ import annotations

import argparse
import re
import resource
import time
from pathlib import Path

VOID = "LogMass_p50 > 11.0 & Web_Class == 'Void' & SNR_Median > 10"


def data_read(con, sql: str) -> float:
    """Bytes DuckDB reports reading for ``sql`` (EXPLAIN ANALYZE "Data Read")."""
    plan = con.execute("EXPLAIN ANALYZE " + sql).fetchall()[0][1]
    m = re.search(r"Data Read:\s*([\d.]+)\s*([kMGT]?B)", plan)
    return float(m.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[m.group(2)] if m else float("nan")


def best_of(fn, n: int = 3) -> float:
    """Fastest of ``n`` timed calls (seconds)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Build if needed, then print the measurements as markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ard", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--embed-fraction", type=float, default=0.02)
    args = ap.parse_args()
    import ard_sql
    from ard_sql import paths
    from ard_sql.build.synth_catalog import SynthOptions, synth_catalog
    from ard_sql.query import build_sql, reads_wide

    if not paths.db_path(args.ard).exists():
        t0 = time.perf_counter()
        synth_catalog(args.ard, SynthOptions(n=args.n, order=args.order, embed_fraction=args.embed_fraction))
        print(f"synth-catalog n={args.n}: {time.perf_counter() - t0:.0f} s")
    total = sum(f.stat().st_size for f in (args.ard / "staging").rglob("*.parquet"))
    with ard_sql.open(args.ard) as db:
        n = db.sql("SELECT count(*) FROM ard").fetchall()[0][0]
        cols = ["TargetID", "Z", "LogMass_p50", "SNR_Median", "Dist_Filament"]
        db.query(VOID, cols)  # warm
        t_void = best_of(lambda: db.query(VOID, cols))
        rows = len(db.query(VOID, cols))
        b_void = data_read(db.con, build_sql(VOID, cols, ard_dir=db.path, compacted=reads_wide(db.con)))
        cone = "cone(150.0, 2.0, 1.0)"
        pruned_sql = build_sql(cone, ["TargetID", "Z"], ard_dir=db.path, compacted=reads_wide(db.con))
        plain_sql = "SELECT TargetID, Z FROM ard WHERE cone(RA, DEC, 150.0, 2.0, 1.0)"
        t_pruned = best_of(lambda: db.query(cone, ["TargetID", "Z"]))
        t_plain = best_of(lambda: db.sql(plain_sql).fetchall())
        b_pruned, b_plain = data_read(db.con, pruned_sql), data_read(db.con, plain_sql)
        n_cone = len(db.query(cone, ["TargetID"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| rows | {n:,} | staging size | {total / 1e9:.2f} GB |")
    print(f"| void query | {t_void * 1e3:.0f} ms warm, {rows} rows | bytes read | {b_void / 1e6:.1f} MB ({100 * b_void / total:.2f}% of the table) |")
    print(f"| 1-degree cone, pruned | {t_pruned * 1e3:.0f} ms, {n_cone} rows | bytes read | {b_pruned / 1e6:.2f} MB |")
    print(f"| same cone, every partition | {t_plain * 1e3:.0f} ms | bytes read | {b_plain / 1e6:.2f} MB |")
    print(f"| cone pruning | {t_plain / t_pruned:.1f}x faster | data read | {b_plain / max(b_pruned, 1):.1f}x less |")
    print(f"| peak RSS of this process | {rss:.0f} MB | | |")


if __name__ == "__main__":
    main()
