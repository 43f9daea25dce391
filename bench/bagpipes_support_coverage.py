"""68 % coverage on the calibration mock with and without the truncation to the physical support.

    python bench/bagpipes_support_coverage.py [CACHE]     # the demo-sized estimator (20,000 simulations)

Trains (or loads from the cache) the estimator, reads its posteriors of the calibration mock's
galaxies both ways, and prints each quantity's [p16, p84] coverage of the truth and the fraction of
untruncated p16 below 0 (impossible for Age and Dust_Av).
"""
import numpy as np, torch, sys
from pathlib import Path
from ard_sql.build.layers import bagpipes as layer
from ard_sql.science import amortized as am
from ard_sql.science.pipes_env import cache_dir
cache = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_dir() / "amortized"
opts = layer.options({"n_sims": 20000, "model_error_mocks": 1})
path, info = layer.train_estimator(cache, opts)
est = am.AmortizedEstimator.load(path)
cal = layer.model_error_set(cache, 1)
truth = {q: cal[f"truth_{q}"] for q in am.QUANTITIES if f"truth_{q}" in cal}
qt = est.percentiles_binned(cal["flux"], cal["ivar"], cal["z"])  # truncated (new)
logw, mu, sigma, scal = est._mixtures(cal["flux"], cal["ivar"], cal["z"], True)
ym, ys = torch.from_numpy(np.asarray(est.y_mean, np.float32)), torch.from_numpy(np.asarray(est.y_std, np.float32))
qu = am.mixture_quantiles(logw, mu * ys[None, :, None] + ym[None, :, None], sigma * ys[None, :, None], (0.16, 0.5, 0.84)).numpy().astype(float)
qu[:, am._anchor_columns(), :] += scal[:, 3].astype(float)[:, None, None]
for j, name in enumerate(am.QUANTITIES):
    qu[:, j] = am.from_target_space(name, qu[:, j])
t = am.to_target_space({q: truth.get(q, np.full(len(cal["z"]), np.nan)) for q in am.QUANTITIES})
for j, name in enumerate(am.QUANTITIES):
    tv = am.from_target_space(name, t[:, j]); ok = np.isfinite(tv)
    if not ok.any(): continue
    c = lambda q: np.mean((tv[ok] >= q[ok, j, 0]) & (tv[ok] <= q[ok, j, 2]))
    out = np.mean((qu[ok, j, 0] < (0 if name in ("Age", "Dust_Av") else -np.inf)))
    print(f"{name:12s} coverage untruncated {c(qu):.3f} truncated {c(qt):.3f}  p16 below 0 before: {out:.3f}  n {ok.sum()}")
