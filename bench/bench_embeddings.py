"""Benchmark: quality of ``emb_astro`` and ``emb_shen`` against a PCA baseline, on a mock survey.

The issue's measure (issue 7): on the mock, with its truth table,

* kNN regression (k = 16, cosine distance, 5-fold cross-validated R^2) from each
  representation to true Z, LogMass, sSFR and Dn4000 (Dn4000 measured by
  ``science.lick`` on the noise-free truth spectra at the true redshift; sSFR
  in log10 / yr, clipped below at -13 because quenched mock galaxies go down to -22
  and a few outliers would otherwise decide R^2);
* precision@k (k = 10) when each injected green pea / post-starburst queries
  the others of its kind (nearest neighbours among all galaxies, itself left out).

Representations: the ARD's ``emb_astro`` and ``emb_shen`` columns, and the
baseline, PCA of the same dimension on normalised rest-frame spectra (each
spectrum shifted to rest frame with the catalogue redshift, resampled on a
log-lambda grid 2250-9800 A, divided by its median, uncovered pixels set to the
sample mean; PCA by SVD). The PCA dimension is the embedding's effective
width (the trained encoder's ``embed_dim``, the rest of the column is zero
padding); PCA with more components is also reported. A last row is PCA of the
same width on the *observed-frame* spectra (no redshift: the information the
encoders get), which shows how much of the baseline's lead is the redshift.

Usage (the ARD built from the mock with ``--layers lick,embed``)::

    python bench/bench_embeddings.py --ard /tmp/a --mock /tmp/m

``--retrain`` instead trains both encoders in this process with the build's
code and the given recipe (for trying recipes without a rebuild).
``--checkpoints FILE|DIR ...`` scores other encoder weights (``specformer*.ckpt``,
``shen*.ckpt``; e.g. ``bench/gpu_embeddings.py``'s snapshots) with their heads
fitted on the ARD's training sample as a build fits them, plus emb_shen's
resampling check for each.
``--head-eps 0.1 0.01`` adds rows for the ARD's own weights with the embedding
head (centre + whitening) refitted on the layer's training sample at each
whitening regularisation: the head alone, the same weights (give the build's
non-default ``train_max`` / ``train_min_snr`` / ``seed`` with ``--set`` so the sample is
the same; not with ``--retrain``, whose weights are not the ARD's).
``--misses`` lists, per representation, the green-pea queries that miss (TargetID, z,
SNR_Median, own kind among the 10 neighbours) and counts the post-starburst ones: which galaxies
a precision below 1 comes from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


# --------------------------------------------------------------------------- data


def load_ard(ard: Path) -> dict:
    """TargetID, catalogue Z, SPECTYPE, SNR_Median, embeddings and spectra of every target in the ARD."""
    import pyarrow.parquet as pq

    from ard_sql import spectra_store
    from ard_sql.build import hats_writer
    from ard_sql.paths import CORE

    cores, waves, fluxes, ivars = [], None, [], []
    for order, pixel, f in hats_writer.partition_files(ard, CORE):
        core = pq.read_table(f, columns=["TargetID", "Z", "SPECTYPE", "SNR_Median"]).to_pandas()
        b = spectra_store.read_partition(ard, order, pixel, core["TargetID"].to_numpy())
        cores.append(core)
        fluxes.append(b.flux)
        ivars.append(b.ivar)
        waves = b.wave
    core = pd.concat(cores, ignore_index=True)
    emb = {}
    parts = [pq.read_table(f).to_pandas() for _, _, f in hats_writer.partition_files(ard, "embed")]
    if parts:
        e = pd.concat(parts, ignore_index=True).set_index("TargetID").reindex(core["TargetID"])
        for col in ("emb_astro", "emb_shen"):
            emb[col] = np.stack([np.full(768, np.nan, np.float32) if v is None or (isinstance(v, float)) else np.asarray(v, np.float32)
                                 for v in e[col]])
    return {"core": core, "wave": np.asarray(waves), "flux": np.concatenate(fluxes), "ivar": np.concatenate(ivars), "emb": emb}


def truth_table(mock: Path, targetid: np.ndarray) -> pd.DataFrame:
    """Truth rows for ``targetid`` plus Dn4000 measured on the noise-free truth spectra."""
    import h5py

    from ard_sql import grid
    from ard_sql.science import lick

    t = pd.read_parquet(mock / "truth.parquet").set_index("TARGETID").reindex(targetid)
    flux = {}
    for f in sorted((mock / "truth_spectra").glob("*.h5")):
        with h5py.File(f, "r") as h:
            for tid, fl in zip(h["targetid"][:], h["flux"][:]):
                flux[int(tid)] = fl
    have = np.array([int(x) in flux for x in targetid])
    dn = np.full(len(targetid), np.nan)
    if have.any():
        F = np.stack([flux[int(x)] for x in targetid[have]])
        m = lick.measure_indices(grid.brz_wavelength(), F, np.ones_like(F), t["Z"].to_numpy()[have])
        dn[have] = m["Dn4000"]
    t["Dn4000_true"] = dn
    return t


def restframe_pca_input(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray,
                        lo: float = 2250.0, hi: float = 9800.0, npix: int = 2000) -> np.ndarray:
    """Normalised rest-frame spectra on a log-lambda grid (NaN where uncovered or bad)."""
    rest = np.exp(np.linspace(np.log(lo), np.log(hi), npix))
    out = np.full((len(flux), npix), np.nan, np.float32)
    for i in range(len(flux)):
        good = ivar[i] > 0
        if good.sum() < 100 or not np.isfinite(z[i]):
            continue
        rw = wave[good] / (1 + z[i])
        y = np.interp(rest, rw, flux[i, good], left=np.nan, right=np.nan)
        med = np.nanmedian(y)
        if np.isfinite(med) and med != 0:
            out[i] = y / abs(med)
    return out


def pca_features(X: np.ndarray, ncomp: int) -> np.ndarray:
    """PCA (SVD) projections of rows of X; NaN entries set to the column mean first."""
    X = np.array(X, np.float64)
    ok = np.isfinite(X).any(axis=1)
    X = X[:, np.isfinite(X[ok]).any(axis=0)]  # drop rest-frame pixels no spectrum covers
    mu = np.nanmean(X[ok], axis=0)
    X = np.where(np.isfinite(X), X, mu)
    X = np.clip(X - mu, -50, 50)
    # eigenvectors of the covariance (much cheaper than an SVD of the data for n_pix ~ 2000)
    _, vecs = np.linalg.eigh(X[ok].T @ X[ok])
    vt = vecs[:, ::-1].T
    out = np.full((len(X), ncomp), np.nan, np.float32)
    out[ok] = X[ok] @ vt[:ncomp].T
    return out


# --------------------------------------------------------------------------- metrics


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def _usable(X: np.ndarray) -> np.ndarray:
    """Rows of X that are vectors (not NULL, not all zero: a cosine is defined)."""
    return np.isfinite(X).all(axis=1) & (np.abs(X).sum(axis=1) > 0)


def knn_r2(X: np.ndarray, y: np.ndarray, k: int = 16, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 of kNN regression (cosine distance, uniform mean of k neighbours)."""
    ok = np.isfinite(y) & _usable(X)
    X, y = _unit(X[ok].astype(np.float64)), y[ok]
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    pred = np.empty_like(y)
    for f in range(folds):
        te, tr = fold == f, fold != f
        sims = X[te] @ X[tr].T
        nn = np.argpartition(-sims, k, axis=1)[:, :k]
        pred[te] = y[tr][nn].mean(axis=1)
    return float(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


def query_hits(X: np.ndarray, labels: np.ndarray, cls: str, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Rows of X (into ``labels``) of the ``cls`` members that can query, and how many of each one's k nearest
    neighbours (cosine, self excluded; rows with a NULL vector are not candidates) are ``cls``."""
    ok = _usable(X)
    Xu, lab = _unit(X[ok].astype(np.float64)), labels[ok]
    q = np.flatnonzero(lab == cls)
    if len(q) < 2:
        return np.flatnonzero(ok)[q], np.zeros(len(q), np.int64)
    if len(Xu) <= k:
        raise ValueError(f"precision@{k} needs more than {k} vectors, got {len(Xu)}")
    sims = Xu[q] @ Xu.T
    sims[np.arange(len(q)), q] = -np.inf
    nn = np.argsort(-sims, axis=1)[:, :k]
    return np.flatnonzero(ok)[q], (lab[nn] == cls).sum(axis=1)


def precision_at_k(X: np.ndarray, labels: np.ndarray, cls: str, k: int = 10) -> float:
    """Mean fraction of the k nearest neighbours (cosine, self excluded) of each ``cls`` member that are ``cls``."""
    rows, hits = query_hits(X, labels, cls, k)
    return float(hits.mean() / k) if len(rows) >= 2 else float("nan")


SNR_BINS = (-np.inf, 0.5, 1.0, 2.0, 5.0, np.inf)
"""SNR_Median bin edges of :func:`quality_by_snr` (SNR_Median is a signed median: the faintest can be <= 0)."""


def quality_by_snr(features: dict[str, np.ndarray], truth: pd.DataFrame, snr: np.ndarray, k: int = 10,
                   bins: tuple[float, ...] = SNR_BINS) -> pd.DataFrame:
    """Neighbour quality per SNR_Median bin: for each galaxy of the bin, the share of its k nearest neighbours
    (cosine, among all galaxies, self left out) of its own population, and |mean neighbour z - z| / (1 + z).

    One row per representation and bin (n, mean share, median z error), plus a "NaN" row where some S/N is unknown;
    rows with a NULL vector are skipped.
    """
    labels = truth["POPULATION"].fillna("").to_numpy()
    z = truth["Z"].to_numpy(np.float64)
    rows = []
    for name, X in features.items():
        ok = np.flatnonzero(_usable(X))
        Xu = _unit(X[ok].astype(np.float64))
        purity, zerr = np.full(len(X), np.nan), np.full(len(X), np.nan)
        for chunk in np.array_split(np.arange(len(ok)), max(1, len(ok) // 512)):
            sims = Xu[chunk] @ Xu.T
            sims[np.arange(len(chunk)), chunk] = -np.inf
            nn = ok[np.argpartition(-sims, k, axis=1)[:, :k]]
            q = ok[chunk]
            purity[q] = (labels[nn] == labels[q][:, None]).mean(axis=1)
            zerr[q] = np.abs(z[nn].mean(axis=1) - z[q]) / (1 + z[q])
        groups = [(f"({lo:g}, {hi:g}]", (snr > lo) & (snr <= hi)) for lo, hi in zip(bins[:-1], bins[1:])]
        if np.isnan(snr).any():
            groups.append(("NaN", np.isnan(snr)))
        for label, in_bin in groups:
            sel = in_bin & np.isfinite(purity)
            rows.append({"representation": name, "SNR_Median": label, "n": int(sel.sum()),
                         f"own kind in {k}": float(purity[sel].mean()) if sel.any() else np.nan,
                         "median dz/(1+z)": float(np.median(zerr[sel])) if sel.any() else np.nan})
    return pd.DataFrame(rows).set_index(["representation", "SNR_Median"])


def print_misses(features: dict[str, np.ndarray], truth: pd.DataFrame, snr: np.ndarray, k: int = 10) -> None:
    """For each representation and rare population, the queries whose k nearest neighbours are not all of their kind."""
    labels = truth["POPULATION"].fillna("").to_numpy()
    for name, X in features.items():
        for cls in ("green_pea", "post_starburst"):
            rows, hits = query_hits(X, labels, cls, k)
            bad = [f"TargetID {truth['TARGETID'].iloc[r]} (z {truth['Z'].iloc[r]:.3f}, SNR_Median {snr[r]:.2f}): {h}/{k}"
                   for r, h in zip(rows, hits) if h < k]
            print(f"{name}, {cls}: {len(rows) - len(bad)} of {len(rows)} queries with {k}/{k}"
                  + ("".join(f"\n    {b}" for b in bad) if cls == "green_pea" else f"; {len(bad)} with fewer"))


def evaluate(features: dict[str, np.ndarray], truth: pd.DataFrame, k: int = 16, kp: int = 10) -> pd.DataFrame:
    """One row per representation: R^2 per property and precision@kp per rare population."""
    targets = {"Z": truth["Z"].to_numpy(), "LogMass": truth["LOG_MASS"].to_numpy(),
               "sSFR": np.clip(truth["SSFR"].to_numpy(), -13, None), "Dn4000": truth["Dn4000_true"].to_numpy()}
    labels = truth["POPULATION"].fillna("").to_numpy()
    rows = []
    for name, X in features.items():
        r = {"representation": name}
        for t, y in targets.items():
            r[f"R2_{t}"] = knn_r2(X, y, k)
        for cls in ("green_pea", "post_starburst"):
            r[f"P@{kp}_{cls}"] = precision_at_k(X, labels, cls, kp)
        rows.append(r)
    return pd.DataFrame(rows).set_index("representation")


def refit_heads(ard: Path, data: dict, rows: np.ndarray, eps: float, samples: dict[str, tuple], seed: int = 0
                ) -> dict[str, np.ndarray]:
    """Both embeddings of ``rows`` from the ARD's checkpoints with their heads refitted at whitening ``eps`` on
    ``samples[encoder]`` (``head_sample``)."""
    from ard_sql.build.layers.embed import ASTRO_CKPT, SHEN_CKPT

    folder = ard / "artifacts" / "embed"
    return {f"emb_{kind}": embed_rows(load_with_head(folder / name, samples[kind], eps, seed), data, rows)
            for kind, name in (("astro", ASTRO_CKPT), ("shen", SHEN_CKPT))}


def embed_rows(model, data: dict, rows: np.ndarray) -> np.ndarray:
    """The column vectors of spectra ``rows`` from an emb_astro (SpecFormer) or emb_shen model."""
    from ard_sql import contract
    from ard_sql.science import shen, specformer

    f, iv = data["flux"][rows], data["ivar"][rows]
    if isinstance(model, specformer.SpecFormer):
        z = data["core"]["Z"].to_numpy(dtype=np.float64, na_value=np.nan)[rows]
        return specformer.embed(model, data["wave"], f, iv, z, out_dim=contract.EMB_ASTRO_DIM)
    return shen.embed(model, data["wave"], f, iv, out_dim=contract.EMB_SHEN_DIM)


def load_with_head(ckpt: Path, sample: tuple, eps: float | None = None, seed: int = 0):
    """An encoder checkpoint (``specformer*`` or ``shen*``) with its embedding head fitted on ``sample``
    (``head_sample``), as a build fits it."""
    from ard_sql import contract
    from ard_sql.science import shen, specformer

    wave, flux, ivar, z = sample
    if ckpt.name.startswith("specformer"):
        model = specformer.load_checkpoint(ckpt)
        specformer.fit_embedding_head(model, wave, flux, ivar, z, out_dim=contract.EMB_ASTRO_DIM, seed=seed,
                                      **({} if eps is None else {"eps": eps}))
    else:
        model = shen.load_checkpoint(ckpt)
        shen.fit_head(model, wave, flux, ivar, seed=seed, eps=eps)
    return model


def resampling_cosines(model, data: dict, pick: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """emb_shen of ``pick`` on the native grid against the same spectra rebinned to log-lambda grids: cosines per grid."""
    from ard_sql.science import shen

    f, iv = data["flux"][pick], data["ivar"][pick]
    e0 = shen.embed(model, data["wave"], f, iv)
    out = []
    for label, lo, hi in (("same range", None, None), ("SDSS range 3800-9200 A", 3800.0, 9200.0)):
        lw, lf, li = shen.resample_loglam(data["wave"], f, iv, 1e-4, lo, hi)
        e1 = shen.embed(model, lw, lf, li)
        out.append((label, np.sum(e0 * e1, 1) / (np.linalg.norm(e0, axis=1) * np.linalg.norm(e1, axis=1))))
    return out


def _checkpoint_files(paths: list[Path]) -> list[Path]:
    """The .ckpt files named, folders expanded (sorted by encoder, then by training seconds)."""
    files = [f for p in paths for f in (sorted(p.glob("*.ckpt")) if p.is_dir() else [p])]

    def key(f: Path) -> tuple:
        tail = f.stem.rsplit("_", 1)[-1].rstrip("s")
        return (f.parent.name, f.name.split("_")[0], float(tail) if tail.replace(".", "").isdigit() else 0.0)

    return sorted(files, key=key)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ard", type=Path, required=True)
    ap.add_argument("--mock", type=Path, required=True, help="the mock folder (truth.parquet, truth_spectra/)")
    ap.add_argument("--retrain", action="store_true", help="train both encoders here instead of reading the ARD's columns")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="embed layer option for --retrain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pca-extra", type=int, nargs="*", default=[16, 768])
    ap.add_argument("--head-eps", type=float, nargs="*", default=[],
                    help="also score the ARD's weights with heads refitted at these whitening regularisations")
    ap.add_argument("--head-snr", type=float, nargs="*", default=None,
                    help="also score the ARD's emb_astro weights with its head fitted on galaxies with SNR_Median above "
                         "each of these (none given: also at every S/N): what recipe 12's head sample changed")
    ap.add_argument("--checkpoints", type=Path, nargs="*", default=[],
                    help="also score these encoder checkpoints (shen*.ckpt / specformer*.ckpt, or folders of them, "
                         "e.g. bench/gpu_embeddings.py's snapshots), heads fitted as the build fits them (head_sample)")
    ap.add_argument("--misses", action="store_true",
                    help="also list, per representation, the green-pea queries whose 10 neighbours are not all green peas "
                         "(TargetID, z, SNR_Median) and count the post-starburst ones")
    ap.add_argument("--by-snr", action="store_true",
                    help="also tabulate neighbour quality (own population among the 10 nearest, their mean z) "
                         "per SNR_Median bin: how a representation holds up on faint spectra")
    ap.add_argument("--json", type=Path, help="write the table here as JSON")
    args = ap.parse_args()
    if args.retrain and args.head_eps:
        ap.error("--head-eps refits the ARD's own weights; it cannot be combined with --retrain")

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_ard(args.ard)
    core = data["core"]
    truth = truth_table(args.mock, core["TargetID"].to_numpy())
    gal = ~truth["POPULATION"].isin(["star", "qso"]).to_numpy() & truth["POPULATION"].notna().to_numpy()
    print(f"loaded {len(core)} spectra ({gal.sum()} galaxies) in {time.perf_counter() - t0:.1f} s")

    from ard_sql.build.layers.embed import options as embed_options

    opts = embed_options(dict(kv.split("=", 1) for kv in args.set))
    train_info = {}
    if args.retrain:
        from ard_sql.build.layers.embed import embed_spectra, train_encoders

        astro_m, shen_m, train_info = train_encoders(args.ard, opts)
        emb = embed_spectra(astro_m, shen_m, data["wave"], data["flux"], data["ivar"],
                            core["Z"].to_numpy(dtype=np.float64, na_value=np.nan))
    else:
        emb = data["emb"]
        log_path = args.ard / "artifacts" / "embed" / "training.json"
        if log_path.exists():
            train_info = json.loads(log_path.read_text())
    widths = {}
    for name in ("astro", "shen"):
        info = train_info.get(name, {})
        widths[name] = int(info.get("config", {}).get("embed_dim", 768))
        if "seconds" in info:
            print(f"training emb_{name}: {info['seconds']:.1f} s, {info.get('steps')} steps, {info.get('n_train')} spectra, "
                  f"epochs {len(info.get('epoch_loss', []))}, loss {info.get('epoch_loss')}")

    # resolution-agnosticism of emb_shen: the same spectra rebinned onto an SDSS-like log-lambda grid
    from ard_sql.science import shen

    shen_model = shen_m if args.retrain else shen.load_checkpoint(args.ard / "artifacts" / "embed" / "shen.ckpt")
    pick = np.flatnonzero(gal)[:: max(1, gal.sum() // 300)][:300]
    for label, cos in resampling_cosines(shen_model, data, pick):
        print(f"emb_shen DESI grid vs log-lambda grid (dloglam 1e-4, {label}), {len(pick)} galaxies: "
              f"cosine min {np.nanmin(cos):.4f}, 1st pct {np.nanpercentile(cos, 1):.4f}, median {np.nanmedian(cos):.4f}")

    rest = restframe_pca_input(data["wave"], data["flux"], data["ivar"], core["Z"].to_numpy())
    feats: dict[str, np.ndarray] = {}
    for name, col in (("astro", "emb_astro"), ("shen", "emb_shen")):
        if col in emb:
            feats[col] = emb[col][gal]
    from ard_sql.build.layers.embed import head_sample

    samples = {kind: head_sample(args.ard, opts, kind) for kind in ("astro", "shen")} if args.head_eps or args.checkpoints else {}
    for eps in args.head_eps:
        for col, X in refit_heads(args.ard, data, np.flatnonzero(gal), eps, samples, opts.get("seed", 0)).items():
            feats[f"{col} (head eps {eps:g})"] = X
    if args.head_snr is not None:
        from ard_sql.build.layers.embed import ASTRO_CKPT, training_sample

        for cut in [*args.head_snr, None]:
            astro_sample = training_sample(args.ard, opts.get("train_max", 4000), cut, opts.get("seed", 0))
            model = load_with_head(args.ard / "artifacts" / "embed" / ASTRO_CKPT, astro_sample, seed=opts.get("seed", 0))
            feats[f"emb_astro (head on SNR_Median {'> %g' % cut if cut is not None else 'any'})"] = \
                embed_rows(model, data, np.flatnonzero(gal))
    if args.checkpoints:
        for ckpt in _checkpoint_files(args.checkpoints):
            kind = "astro" if ckpt.name.startswith("specformer") else "shen"
            model = load_with_head(ckpt, samples[kind], seed=opts.get("seed", 0))
            label = f"emb_{kind} ({ckpt.parent.name}/{ckpt.stem})"
            feats[label] = embed_rows(model, data, np.flatnonzero(gal))
            if kind == "shen":
                cos = resampling_cosines(model, data, pick)[0][1]
                print(f"{label}: resampling cosine min {np.nanmin(cos):.4f}, median {np.nanmedian(cos):.4f}")
            print(f"scored {ckpt} ({time.perf_counter() - t0:.0f} s)", flush=True)
    Xg = rest[gal]
    for d in sorted({*widths.values(), *args.pca_extra}):
        feats[f"PCA-{d} (rest frame)"] = pca_features(Xg, d)
    # the same information as the encoders (observed frame, no redshift): how much of the gap is the redshift
    obs = restframe_pca_input(data["wave"], data["flux"], data["ivar"], np.zeros(len(core)),
                              lo=float(data["wave"][0]), hi=float(data["wave"][-1]))
    d = max(widths.values())
    feats[f"PCA-{d} (observed frame, no z)"] = pca_features(obs[gal], d)
    res = evaluate(feats, truth[gal].reset_index())
    pd.set_option("display.width", 200)
    print(res.round(3).to_string())
    if args.misses:
        print_misses(feats, truth[gal].reset_index(), core["SNR_Median"].to_numpy()[gal])
    if args.by_snr:
        print(quality_by_snr(feats, truth[gal].reset_index(), core["SNR_Median"].to_numpy()[gal]).round(3).to_string())
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        args.json.write_text(res.to_json(indent=1))


if __name__ == "__main__":
    main()
