"""``ard demo``: mock survey -> every layer -> the blueprint's example workflow, printed, with plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ard_sql import paths
from ard_sql.commands._common import console, counting_bar, fail

if TYPE_CHECKING:  # pragma: no cover
    from ard_sql.connection import ARD

#: The blueprint's query (section 5.2), run as written.
VOID_QUERY = "LogMass_p50 > 11.0 & Web_Class == 'Void' & SNR_Median > 10"
#: The seed query where the survey is too sparse for Web_Class (the README's example does the same).
MASS_QUERY = "SPECTYPE == 'GALAXY' & LogMass_p50 > 10.5 & SNR_Median > 10"
#: Said after the build: the demo's columns are weaker than a default build's, whose figures the docs give.
DEMO_SIZED = ("This is a demo-sized build, weaker than a default one: each encoder trained for 150 steps (default 2000), "
              "the amortized posteriors saw 20,000 "
              "simulations and one calibration mock (default 80,000 and three; the demo's model errors are less "
              "well fitted, so its intervals cover the truth less often). The quality figures of README.md and "
              "bench/RESULTS.md are for the defaults: `ard build survey --out my_ard` gives them.")
#: Demo-sized layer options: bounded training so the demo builds in minutes on 2 cores, and
#: the topology in the mock's own cosmology (a real survey keeps the layer's Planck18 default).
#: The demo's amortized estimator sees 20,000 simulations and one calibration mock (~5 min on
#: 2 cores, then cached); a real build's default is 80,000 and three, which is what the numbers
#: in bench/RESULTS.md are for. 20,000 is the weaker estimator: its LogMass medians lay 0.15 dex
#: from production Bagpipes fits where 80,000 give 0.05 (bench/RESULTS.md, "Bagpipes layer").
DEMO_LAYER_OPTIONS: dict[str, dict[str, object]] = {
    "embed": {"steps": 150, "train_max": 2000},
    "topology": {"cosmology": "FlatLambdaCDM(H0=70, Om0=0.3)"},
    "bagpipes": {"n_sims": 20000, "model_error_mocks": 1},
}


def _demo_layer_options() -> dict[str, dict[str, object]]:
    """DEMO_LAYER_OPTIONS plus a per-user cache of the amortized estimator, so a second demo skips its simulations."""
    from ard_sql.science import pipes_env

    opts = {k: dict(v) for k, v in DEMO_LAYER_OPTIONS.items()}
    opts["bagpipes"]["cache_dir"] = str(pipes_env.cache_dir() / "amortized")
    return opts


def _mock(survey: Path, n: int, seed: int, area: float | None, zmax: float, progress: bool) -> None:
    """Write the demo's mock survey into ``survey``, reusing one already there only if every setting matches."""
    import shutil

    from ard_sql.build.mock.survey import MockConfig, run_mock

    cfg = MockConfig(out=survey, n=n, seed=seed, area=area, zmax=zmax, truth_spectra=True)
    cfg.validate()
    summary = survey / "mock.json"
    if summary.exists():
        try:
            done = json.loads(summary.read_text())
        except (OSError, ValueError):
            done = {}  # unreadable: treat as a different mock and regenerate it
        if not isinstance(done, dict):
            done = {}
        # Compare every setting that shapes the mock (area, zmax, physics, ...), not only n and seed:
        # a mock.json from an older version lacks some of them and so is regenerated too.
        wanted = cfg.settings()
        differ = {k: (done.get(k), v) for k, v in wanted.items() if done.get(k) != v}
        if not differ:
            console.print(f"mock survey already in {survey} (n={n}, seed={seed}, area={cfg.area_deg2:g} deg^2, "
                          f"zmax={zmax:g}): reused", highlight=False)
            return
        console.print(f"mock survey in {survey} was made with other settings ("
                      + ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items())
                      + "): regenerated", highlight=False)
        # A different footprint makes different partition files: stale ones from the old mock
        # would be ingested with the new ones, so clear the folder (it holds a finished mock of ours).
        shutil.rmtree(survey)
    with counting_bar("mock survey (targets)", n, progress) as bar:
        run_mock(cfg, progress=bar)


def _null_web_fractions(db: ARD) -> tuple[float, float]:
    """Fractions of the galaxies whose Web_Class the topology layer left NULL as too sparse (bit SPARSE)
    and, of the others, as lying where the tide comes mostly from outside the survey (bit TIDE_EDGE)."""
    from ard_sql.build.layers.topology import FLAGS

    sparse, edge = FLAGS["SPARSE"], FLAGS["TIDE_EDGE"]
    n_sparse, n_edge, n_gal = db.sql(
        f"SELECT count(*) FILTER (WHERE Topology_flag & {sparse} <> 0), "
        f"count(*) FILTER (WHERE Topology_flag & {edge} <> 0 AND Topology_flag & {sparse} = 0), count(*) "
        "FROM ard WHERE SPECTYPE = 'GALAXY'").fetchall()[0]
    return n_sparse / max(n_gal, 1), n_edge / max(n_gal, 1)


def _workflow(out: Path) -> dict[str, object]:
    """The example workflow of the blueprint on the demo ARD; prints each step, returns what it found."""
    import ard_sql

    plots = out / "plots"
    result: dict[str, object] = {}
    with ard_sql.open(out) as db:
        console.rule("1. The query: massive galaxies in voids")
        console.print(f'db.query("{VOID_QUERY}", columns=[...])')
        cols = ["TargetID", "Z", "LogMass_p50", "Web_Class", "SNR_Median", "Dist_Filament", "emb_astro"]
        sample = db.query(VOID_QUERY, columns=cols)
        console.print(f"{len(sample)} galaxies")
        result["void_query_rows"] = len(sample)
        result["sparse_fraction"], result["tide_edge_fraction"] = _null_web_fractions(db)
        if result["sparse_fraction"] > 0.5:
            # Say why instead of letting an empty answer look like "no massive galaxy lives in a void".
            console.print(f"Web_Class is NULL for {result['sparse_fraction']:.0%} of the galaxies (Topology_flag bit "
                          "SPARSE): this demo's 3000 targets (~3e-4 per Mpc^3) are too few for a T-web at 4 Mpc; "
                          "it needs ~0.002 per Mpc^3 over >= 100 deg^2 (bench/RESULTS.md, 'Topology layer'); "
                          f"{result['tide_edge_fraction']:.1%} more lie where the tide comes mostly from outside "
                          "the survey (bit TIDE_EDGE).")
        if sample.empty and result["sparse_fraction"] > 0.5:
            # no Web_Class to select on: relaxing the mass cut cannot help, so seed from mass alone
            sample = db.query(MASS_QUERY, columns=cols)
            console.print(f"so no void can be selected here; the workflow goes on from {MASS_QUERY!r} "
                          f"(environment not used): {len(sample)} galaxies")
        if sample.empty:
            # A small mock may hold no galaxy above 10^11 Msun in a void: say so, then widen the
            # mass cut step by step so the rest of the workflow has a seed galaxy.
            for cut in (10.5, 10.0, 9.0):
                relaxed = VOID_QUERY.replace("11.0", f"{cut}")
                sample = db.query(relaxed, columns=cols)
                console.print(f"none at this survey size; relaxed to {relaxed!r}: {len(sample)} galaxies")
                if not sample.empty:
                    break
        if sample.empty:
            sample = db.query("SPECTYPE == 'GALAXY' & emb_astro IS NOT NULL & SNR_Median > 10", columns=cols)
            console.print(f"still none: any galaxy with an embedding and S/N > 10: {len(sample)}")
        console.print(sample.drop(columns=["emb_astro"]).head(10).to_string())
        console.rule("2. The similarity search: galaxies like the first one")
        if sample.empty or sample.emb_astro.isna().all():
            console.print("no embedding in this ARD (run the embed layer): similarity search skipped")
            return result
        seed = sample.dropna(subset=["emb_astro"]).iloc[0]
        console.print(f"target_vector = sample.loc[0, 'emb_astro']   (TargetID {seed.TargetID})")
        neighbours = db.find_similar(vector=seed.emb_astro, k=50)
        itself = int((neighbours.TargetID == seed.TargetID).sum())
        console.print(f"db.find_similar(vector=target_vector, k=50): {len(neighbours)} rows"
                      + (f": the seed itself (distance 0) and its {len(neighbours) - itself} nearest neighbours"
                         if itself else ""))
        console.print(neighbours[["distance", "TargetID", "Z", "LogMass_p50", "Dn4000", "Web_Class"]].head(10).to_string())
        result["neighbours"] = len(neighbours)
        console.rule("3. The deep dive: the spectra, with the models")
        fig = ard_sql.plot_spectrum(neighbours.TargetID[:3], show_model=True, db=db, out=plots / "neighbours.png")
        result["plots"] = [str(plots / "neighbours.png")]
        for name, fn in (("quenching_diagram", ard_sql.plot_quenching_diagram), ("bpt", ard_sql.plot_bpt),
                         ("sky_by_web_class", ard_sql.plot_sky)):
            fn(db=db, out=plots / f"{name}.png")
            result["plots"].append(str(plots / f"{name}.png"))
        del fig
        console.print("plots: " + ", ".join(result["plots"]))
    return result


def demo(
    out: Path = typer.Option(Path("ard_demo"), "--out", help="Folder for the demo: the ARD, survey/ (the mock) and plots/."),
    n: int = typer.Option(3000, "--n", help="Number of mock targets."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the mock survey."),
    area: float = typer.Option(30.0, "--area", help="Mock footprint in deg^2."),
    zmax: float = typer.Option(0.4, "--zmax", help="Highest mock redshift."),
    workers: int = typer.Option(None, "--workers", help="Local worker processes (default: CPU count)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Build the demo ARD from a mock survey with every layer, then run the blueprint's example workflow.

    Steps: `ard mock` into OUT/survey, `ard build` into OUT (every available
    layer), then the workflow: the void query, a similarity search around
    its first galaxy, and plots of the neighbours' spectra with their
    models (OUT/plots). Re-running reuses what is already built.
    """
    from ard_sql.build.options import BuildOptions
    from ard_sql.build.orchestrator import BuildFailed, build

    t0 = time.perf_counter()
    out = out.resolve()
    try:
        _mock(out / "survey", n, seed, area, zmax, progress)
        opts = BuildOptions(out=str(out), source=str(out / "survey"), zcat=str(next((out / "survey").rglob("z*-pix-*.fits"), "")) or None,
                            workers=workers, progress=progress, layer_options=_demo_layer_options())
        report = build(opts)
    except (ValueError, BuildFailed) as exc:
        raise fail(str(exc)) from None
    for problem in report.errors:
        console.print(str(problem), style="red", highlight=False)
    for name, info in report.layers.items():
        console.print(f"{name}: {info}", highlight=False)
    console.print(DEMO_SIZED, style="yellow", highlight=False)
    result = _workflow(out)
    console.rule("done")
    console.print(f"demo ARD in {out}; {time.perf_counter() - t0:.0f} s. Open it with ard_sql.open({str(out)!r}) "
                  f"or `ard sql {out} \"SELECT ...\"`.")
    paths.atomic_write_text(out / "demo-result.json", json.dumps(result, indent=1, default=str))


def register(app: typer.Typer) -> None:
    """Add ``ard demo`` to the app."""
    app.command("demo", short_help="Build the demo ARD and run the example workflow.")(demo)
