"""Purity and completeness of the case-study views against the mock survey's injected truth.

Run on an ARD built from ``ard mock`` (e.g. the demo)::

    python3 bench/bench_case_studies.py --ard ard_demo --truth ard_demo/survey/truth.parquet

For each view, the truth label it aims at:

* ``green_pea_candidates``  -> POPULATION = 'green_pea'
* ``post_starbursts``       -> POPULATION = 'post_starburst'
* ``red_misfits``           -> POPULATION = 'frosting' (young light on an old mass)
* ``green_valley_by_environment`` -> true log sSFR in the green valley, -11.8 < log sSFR < -10.8
  (scored on the rows the view aggregates: Dn4000 in 1.45-1.75 with a class and a mass)

Purity = selected and true / selected; completeness = selected and true /
true among the galaxies the view could see (those with the columns it needs
measured, so a layer that did not run is not counted as a miss).
"""

from __future__ import annotations

import argparse

import ard_sql

#: view -> (truth condition, columns the view needs non-NULL to be able to select a galaxy)
TARGETS: dict[str, tuple[str, list[str]]] = {
    "green_pea_candidates": ("t.POPULATION = 'green_pea'", ["OIII_5007_Flux", "Hbeta_Flux"]),
    "post_starbursts": ("t.POPULATION = 'post_starburst'", ["Hdelta_A", "Dn4000"]),
    "red_misfits": ("t.POPULATION = 'frosting'", ["Dn4000", "Age_p16"]),
}
GREEN_VALLEY_TRUTH = "t.SSFR BETWEEN -11.8 AND -10.8"


def score(db, truth: str) -> list[dict]:
    """One row per view: selected, true positives, purity, completeness."""
    db.execute(f"CREATE OR REPLACE TEMP VIEW truth AS SELECT * FROM read_parquet('{truth}')")
    rows = []
    for view, (cond, needs) in TARGETS.items():
        visible = " AND ".join(f"a.{c} IS NOT NULL" for c in needs)
        sel, tp = db.sql(f"SELECT count(*), count(*) FILTER (WHERE {cond}) FROM {view} v JOIN truth t ON t.TARGETID = v.TargetID").fetchall()[0]
        n_true = db.sql(f"SELECT count(*) FROM ard a JOIN truth t ON t.TARGETID = a.TargetID WHERE {cond} AND {visible}").fetchall()[0][0]
        rows.append({"view": view, "selected": sel, "true_positives": tp, "purity": tp / sel if sel else float("nan"),
                     "completeness": tp / n_true if n_true else float("nan"), "true_visible": n_true})
    gv = ("a.Dn4000 > 1.45 AND a.Dn4000 < 1.75 AND a.Web_Class IS NOT NULL AND a.LogMass_p50 IS NOT NULL")
    sel, tp = db.sql(f"SELECT count(*), count(*) FILTER (WHERE {GREEN_VALLEY_TRUTH}) FROM ard a JOIN truth t ON t.TARGETID = a.TargetID WHERE {gv}").fetchall()[0]
    n_true = db.sql(f"SELECT count(*) FROM ard a JOIN truth t ON t.TARGETID = a.TargetID WHERE {GREEN_VALLEY_TRUTH} AND a.Dn4000 IS NOT NULL AND a.Web_Class IS NOT NULL AND a.LogMass_p50 IS NOT NULL").fetchall()[0][0]
    rows.append({"view": "green_valley_by_environment", "selected": sel, "true_positives": tp,
                 "purity": tp / sel if sel else float("nan"), "completeness": tp / n_true if n_true else float("nan"),
                 "true_visible": n_true})
    return rows


def main() -> None:
    """Print the table (markdown) for bench/RESULTS.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ard", required=True)
    ap.add_argument("--truth", required=True)
    args = ap.parse_args()
    with ard_sql.open(args.ard) as db:
        rows = score(db, args.truth)
    print("| view | selected | true positives | purity | completeness | true (visible) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['view']} | {r['selected']} | {r['true_positives']} | {r['purity']:.2f} | {r['completeness']:.2f} | {r['true_visible']} |")


if __name__ == "__main__":
    main()
