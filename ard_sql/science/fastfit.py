"""Fast mode: a batched pPXF-like fitter in torch (CPU, or a GPU when present).

Same physics as ``kinematics.ReferenceFitter`` and the same pixels (``kinematics.prepare``):
templates on a ln(lambda) grid convolved with a Gaussian LOSVD through its analytic
Fourier transform (as pPXF does), an additive Legendre polynomial, the 12 gas lines
as pixel-integrated Gaussians in two kinematic groups (Balmer, forbidden), and
non-negative template and line weights (polynomial free), for a batch of spectra at once.

Algorithm (per batch, all spectra in parallel):

1. linear step: at fixed kinematics, the bounded least squares for every template, line
   and polynomial weight (batched block-principal-pivoting NNLS on the normal equations);
2. kinematic step: with the stellar mix frozen into one composite template, a
   Levenberg-Marquardt search over (V*, sigma*, V_Balmer, sigma_Balmer, V_forb, sigma_forb)
   with the linear weights profiled out at every evaluation (variable projection). The
   gradient of the profiled chi2 is exact (envelope theorem) and the Gauss-Newton matrix is
   Kaufman's approximation, both from analytic derivatives: the LOSVD's Fourier transform
   for the stars, the derivatives of the pixel-integrated Gaussians for the gas. No finite
   differences, one model evaluation per iteration; converged spectra leave the batch;
3. steps 1-2 three times, then a closing linear step at the final kinematics:
   - first, at the starting kinematics, the linear step uses only the ages at the metallicity
     nearest solar (a quarter of the default library) and its LM pass stops early (10
     iterations): it only has to bring the kinematics near the optimum;
   - second, every template, re-solving the mix there (LM: up to 30 iterations);
   - third, the templates active in the second (an active-set continuation), so that the
     kinematics and the mix agree: two alternations stop short of the joint optimum (NGC 3522:
     102.4 km/s after two, 102.03 after three or more, pPXF 101.6). Most rows are already
     converged; the rest get up to 5 iterations;
   - the closing step, over the same templates, refits only the rows whose kinematics moved in
     the third pass, and gives the fluxes, their errors and the models.
   Against the two all-template passes this replaced: the same speed, and closer to pPXF
   (median |dsigma|/sigma 0.0084 -> 0.0068, 90th percentile 0.052 -> 0.039; bench/RESULTS.md).

Where the cost goes, and why it is small: chi2, its gradient and the Gauss-Newton matrix
are assembled from inner products (the normal equations), never from residual vectors;
dense products over all pixels involve only the composite template and its two
derivatives; the gas lines are evaluated only in windows of +-4 sigma around each line
(disjoint nearest-line cells), never on the whole spectrum; the all-template steps run
their FFTs in single precision (products and solves in double), a few rows at a time.
With one thread each it is 22-25x faster than pPXF per spectrum (20.6-22.1x on a harder sample) for the same
results (bench/bench_ppxf.py; bench/RESULTS.md). On a GPU (an H100) it gives the CPU's results to
float rounding but only 1.1-1.5x the speed of 16 CPU threads: launch-bound, not tuned for one
(bench/bench_fastfit_devices.py).

Convergence: a spectrum stops iterating when the Gauss-Newton model predicts that no step can
lower chi2 by more than ``chi2_tol`` x max(1, reduced chi2), or when every parameter's next
step is below ``step_tol`` of its error; the tolerance relaxes for the few spectra that are still
iterating after ``relax_after`` steps. A spectrum that does not meet ``chi2_tol_final`` after the
iteration budget is flagged NOT_CONVERGED and every fitted quantity (kinematics, line fluxes and
their errors, chi2, Gas_Av, models) is NULL.

Errors: kinematics from the Gauss-Newton matrix, (J^T J)^-1 x reduced chi2; fluxes from the
covariance of the final linear solve x reduced chi2 (pPXF's formal errors x sqrt(chi2)).
Reduced chi2 as pPXF: chi2 / (good pixels - kinematic parameters).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import scipy.fft
import torch

from ard_sql.science.kinematics import (
    C_KMS, FLAGS, LINE_NAMES, LINES, FitConfig, FitRun, KinematicsResult, at_lines, gas_sigma_at_upper_bound,
    kinematics_constrained, line_pixels, resample_templates,
)

_log = logging.getLogger(__name__)

_LINE_WAVE = np.array([LINES[nm][0] for nm in LINE_NAMES])
_LINE_GROUP = np.array([LINES[nm][1] for nm in LINE_NAMES])  # 1 Balmer, 2 forbidden
_NL = len(LINE_NAMES)
_SQPI = np.sqrt(np.pi)
_SQ2 = np.sqrt(2.0)


def _legendre(x: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree at x (..., M) -> (..., M, degree+1)."""
    out = [torch.ones_like(x), x]
    for k in range(1, degree):
        out.append(((2 * k + 1) * x * out[k] - k * out[k - 1]) / (k + 1))
    return torch.stack(out[: degree + 1], -1)


def _masked_solve(Hs: torch.Tensor, bs: torch.Tensor, free: torch.Tensor, ridge: float = 1e-11) -> torch.Tensor:
    """Solve Hs[F, F] x_F = bs[F] for every row, x = 0 outside F (Hs scaled to unit diagonal)."""
    fm = free.to(Hs.dtype)
    K = Hs.shape[-1]
    eye = torch.eye(K, dtype=Hs.dtype, device=Hs.device)
    Hf = Hs * fm[:, :, None] * fm[:, None, :] + eye * (1 - fm)[:, None, :] + ridge * eye
    L, info = torch.linalg.cholesky_ex(Hf)
    if bool((info != 0).any()):
        return torch.linalg.lstsq(Hf, (bs * fm)[..., None]).solution[..., 0] * fm
    return torch.cholesky_solve((bs * fm)[..., None], L)[..., 0] * fm


def nnls_normal(H: torch.Tensor, b: torch.Tensor, constrained: torch.Tensor, allowed: torch.Tensor,
                free0: torch.Tensor | None = None, maxit: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched min 0.5 x'Hx - b'x with x_k >= 0 where ``constrained[k]``, on the normal equations.

    Block principal pivoting (Kim & Park 2011, SIAM J. Sci. Comput. 33, 3261): every infeasible
    variable changes side at once, with Murty's single-variable rule as the backup that guarantees
    termination; a few batched Cholesky solves even from a cold start (Lawson-Hanson needs one per
    variable that enters). H (B, K, K) symmetric positive semi-definite, b (B, K); ``constrained``
    (K,) bool; ``allowed`` (B, K) bool: False fixes x_k = 0 (a line outside coverage). ``free0``
    (B, K) warm-starts the passive set. Returns x (B, K), the passive set (B, K), H^-1 on the passive
    set (B, K, K, zeros elsewhere), and whether each row met the KKT conditions.
    """
    B, K = b.shape
    dt = H.dtype
    dev = H.device
    d = torch.diagonal(H, dim1=1, dim2=2)
    allowed = allowed & (d > 1e-300)
    scale = torch.sqrt(d.clamp_min(1e-300))
    Hs = H / scale[:, :, None] / scale[:, None, :]
    bs = b / scale
    con = constrained.to(dev)[None, :].expand(B, K) & allowed
    free = (free0 if free0 is not None else torch.ones_like(allowed)) & allowed
    free = free | (~constrained.to(dev)[None, :] & allowed)
    tol = 1e-10 * (1 + bs.abs().amax(1, keepdim=True))
    best = torch.full((B,), K + 1, dtype=torch.long, device=dev)
    tries = torch.full((B,), 3, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    x = torch.zeros_like(bs)
    idx = torch.arange(K, device=dev)
    act = torch.arange(B, device=dev)
    for _ in range(maxit or 5 * K):
        # solve only for the rows not yet done (re-gathering when enough have finished)
        if act.numel() > 2 * int((~done).sum()):
            act = torch.nonzero(~done).flatten()
        s = torch.zeros_like(bs)
        s[act] = _masked_solve(Hs[act], bs[act], free[act])
        grad = bs - (Hs @ s[..., None])[..., 0]  # > 0: the objective falls if x_k grows
        bad = (free & con & (s < 0)) | (~free & con & (grad > tol))
        nbad = bad.sum(1)
        x = torch.where(done[:, None], x, s)
        fin = (nbad == 0) & ~done
        done = done | fin
        if bool(done.all()):
            break
        act = ~done
        better = act & (nbad < best)
        backup = act & ~better & (tries > 0)
        single = act & ~better & (tries <= 0)
        best = torch.where(better, nbad, best)
        tries = torch.where(better, torch.full_like(tries, 3), torch.where(backup, tries - 1, tries))
        last = torch.where(bad, idx[None, :], torch.full_like(bad, -1, dtype=torch.long)).amax(1)
        one = (idx[None, :] == last[:, None]) & bad
        flip = torch.where((better | backup)[:, None], bad, torch.where(single[:, None], one, torch.zeros_like(bad)))
        free = free ^ flip
    x = torch.where(con, x.clamp_min(0), x) * allowed
    fm = free.to(dt)
    eye = torch.eye(K, dtype=dt, device=dev)
    Hf = Hs * fm[:, :, None] * fm[:, None, :] + eye * (1 - fm)[:, None, :] + 1e-11 * eye
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky_ex(Hf)[0]) * fm[:, :, None] * fm[:, None, :]
    Hinv = Hinv / scale[:, :, None] / scale[:, None, :]
    return x / scale, free, Hinv, done


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, restoring the previous count on exit (even on error).

    ``None`` or 0 leaves the count alone. Shared with the bagpipes layer: a process-wide cap that is
    never restored would slow every later torch user of the process (e.g. the embed layer's training).
    """
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def start_templates(metals: np.ndarray) -> np.ndarray:
    """Columns of the first linear step: every age at the library's metallicity nearest solar."""
    grid = np.unique(metals)
    return np.flatnonzero(metals == grid[np.argmin(np.abs(grid))])


class FastFitter:
    """Batched fitter; ``fit`` has the same signature and output as ``ReferenceFitter.fit``."""

    #: LM iterations allowed in each kinematic pass (module docstring, step 3). Two all-template
    #: passes of (20, 10) left a S/N 1.4 mock spectrum unconverged that pPXF fits; converged rows
    #: leave the batch, so a large budget costs only the stragglers.
    lm_iters = (10, 30, 5)
    #: A row stops iterating when the Gauss-Newton model predicts no step can lower chi2 by more than
    #: this (x max(1, reduced chi2)): the kinematics are within ~0.1 of their errors of the optimum.
    chi2_tol = 0.01
    #: After the iteration budget a row counts as converged when that predicted decrease is below this
    #: (kinematics within ~1 error of the optimum); otherwise NOT_CONVERGED and every fitted value NULL.
    chi2_tol_final = 1.0
    #: ... or when the Gauss-Newton step of every parameter is below this fraction of its error
    #: (V*, sigma*, V_Balmer, sigma_Balmer, V_forbidden, sigma_forbidden).
    relax_after, relax_rate = 6, 1.5
    #: Half-width of the gas-line windows in effective sigma: +-4 sigma hold all but 6e-5 of a line's
    #: flux (+-6, used before, cost 9% more time for the same fits to 4 decimals, bench/RESULTS.md).
    line_window = 4.0
    #: Initial Levenberg-Marquardt damping (relative to the diagonal).
    lm_lambda0 = 1e-3
    step_tol = torch.tensor([0.2, 0.2, 0.5, 0.5, 0.5, 0.5])

    def __init__(self, template_path, config: FitConfig | None = None, device: str | None = None,
                 batch_size: int = 64, dtype=torch.float64, threads: int | None = None,
                 full_precision: str = "single"):
        from ard_sql.science.templates import load_templates

        self.config = config or FitConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.batch_size = batch_size
        self.threads = self.config.threads if threads is None else threads
        tpl = load_templates(template_path)
        self.template_fwhm = (tpl.lam, tpl.fwhm)  # per wavelength: a library's resolution may vary
        flux, self.ln_lam_tpl = resample_templates(tpl.lam, tpl.flux, self.config.velscale)
        nt = flux.shape[0]
        self.L = int(scipy.fft.next_fast_len(nt + 256, real=True))
        # pad by a linear ramp from the last value back to the first: a smooth periodic extension for the FFT
        ramp = np.linspace(0, 1, self.L - nt)[:, None]
        padded = np.vstack([flux, flux[-1] * (1 - ramp) + flux[0] * ramp])
        self.tpl_ft = torch.fft.rfft(torch.as_tensor(padded.T, dtype=dtype, device=self.device), dim=-1)  # (T, F)
        # the all-template linear steps run their FFTs and pixel sums in single precision (their weights
        # feed a double-precision solve; the kinematic steps stay in double)
        self._tpl_re, self._tpl_im = self.tpl_ft.real.contiguous(), self.tpl_ft.imag.contiguous()
        self.tpl_ft_full = self.tpl_ft.to(torch.complex64 if full_precision == "single" else self.cdtype)
        self.freq = torch.fft.rfftfreq(self.L, device=self.device).to(dtype)  # cycles / pixel
        self.ntpl = flux.shape[1]
        self.start_templates = start_templates(tpl.metals)
        self.npix_tpl = nt
        self._balmer = torch.as_tensor(_LINE_GROUP == 1, dtype=dtype, device=self.device)
        self._forb = torch.as_tensor(_LINE_GROUP == 2, dtype=dtype, device=self.device)
        self._lnw = torch.as_tensor(np.log(_LINE_WAVE), dtype=dtype, device=self.device)
        blends = [[0, 1], [2], [3], [4], [5, 6], [7, 8, 9], [10, 11]]  # lines that can overlap (wavelength order)
        mates = np.array([[j] * 3 for j in range(_NL)])
        mask = np.zeros((_NL, 3), bool)
        for bl in blends:
            for j in bl:
                mates[j, : len(bl)] = bl
                mask[j, : len(bl)] = True
        self._mates = torch.as_tensor(mates, device=self.device)
        self._mates_mask = torch.as_tensor(mask, device=self.device)

    # ------------------------------------------------------------------ public
    def fit(self, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None, lsf_sigma: np.ndarray,
            z: np.ndarray) -> KinematicsResult:
        """Fit every spectrum of the batch; never raises for a bad spectrum (NULLs + flag instead).

        A batch whose fit raises is refitted one spectrum at a time, so that only the spectra that
        fail alone are flagged FIT_FAILED (one bad spectrum must not cost its batch-mates their fits).
        """
        run = FitRun.start(wave, flux, ivar, mask, lsf_sigma, z, self.template_fwhm, self.config)
        idx = np.flatnonzero(run.prep.usable)
        with torch_threads(self.threads), torch.no_grad():
            for b0 in range(0, idx.size, self.batch_size):
                sub = idx[b0 : b0 + self.batch_size]
                try:
                    self._fit_batch(run.prep, sub, run.covered, run.cols, run.flag, run.stars, run.gas)
                except Exception as exc:  # noqa: BLE001 - a failed fit is NULLs + flags, never a crashed build
                    if sub.size == 1:
                        _log.warning("fast pPXF fit of spectrum %d failed: %r", int(sub[0]), exc)
                        run.failed(sub)
                        continue
                    _log.warning("fast pPXF batch of %d spectra failed (%r); refitting them one at a time",
                                 sub.size, exc)
                    for i in sub:
                        self._refit_one(run, int(i))
        return run.finish(wave)

    def _refit_one(self, run: FitRun, i: int) -> None:
        """Fit spectrum ``i`` alone after its batch raised; FIT_FAILED (all NULL) only if it raises alone."""
        # the failed batch may have stored some rows before raising: start this row from a clean slate
        run.flag[i] = run.prep.flag[i]
        for v in run.cols.values():
            v[i] = np.nan
        run.stars[i] = np.nan
        run.gas[i] = np.nan
        try:
            self._fit_batch(run.prep, np.array([i]), run.covered, run.cols, run.flag, run.stars, run.gas)
        except Exception as exc:  # noqa: BLE001 - a failed fit is NULLs + a flag, never a crashed build
            _log.warning("fast pPXF fit of spectrum %d failed: %r", i, exc)
            run.failed([i])

    # ------------------------------------------------------------------ setup
    def _setup(self, prep, sub, covered) -> dict:
        """Per-spectrum tensors that do not depend on the kinematics (window, weights, polynomials)."""
        cfg, dev, dt = self.config, self.device, self.dtype
        step = cfg.velscale / C_KMS
        good = prep.good[sub]
        first = good.argmax(1)
        last = good.shape[1] - 1 - good[:, ::-1].argmax(1)
        M = int((last - first).max()) + 1
        j = np.arange(M)[None, :]
        cols = np.clip(first[:, None] + j, 0, good.shape[1] - 1)
        inwin = j <= (last - first)[:, None]
        rows = sub[:, None]
        w = np.where(inwin & prep.good[rows, cols], 1.0 / prep.noise[rows, cols], 0.0)
        scale = np.nanmedian(np.where(prep.good[sub], prep.flux[sub], np.nan), axis=1)
        scale = np.where(scale > 0, scale, [max(np.mean(np.abs(prep.flux[i, prep.good[i]])), 1e-30) for i in sub])
        y = np.where(inwin, prep.flux[rows, cols], 0.0) / scale[:, None]
        w = w * scale[:, None]
        zz = prep.z[sub]
        x0 = prep.ln_lam[first] - np.log1p(zz)  # rest ln(lambda) of window pixel 0
        shift = (x0 - self.ln_lam_tpl[0]) / step
        # Legendre x in [-1, 1] over each spectrum's window, as pPXF over its input array
        xl = np.where(inwin, -1 + 2 * j / np.maximum(last - first, 1)[:, None], 0.0)
        # effective instrumental sigma (km/s) at each line (fit window clamps lines outside it)
        pos = np.clip(line_pixels(prep, sub), first[:, None], last[:, None])
        inst = at_lines(prep.fwhm_rest[sub], pos) / 2.3548 / _LINE_WAVE * C_KMS
        T = lambda a: torch.as_tensor(a, dtype=dt, device=dev)  # noqa: E731
        P = _legendre(T(xl), cfg.degree) * T(inwin)[..., None]
        wt = T(w)
        yt = T(y)
        Pw = P * wt[..., None]
        yw = yt * wt
        return dict(M=M, y=yt, w=wt, PYw=torch.cat([Pw, yw[..., None]], -1), PWP=Pw.transpose(1, 2) @ Pw,
                    span=T(np.maximum(last - first, 1)),
                    PWy=(Pw.transpose(1, 2) @ yw[..., None])[..., 0],
                    yWy=(yw**2).sum(1), x0=T(x0), shift=T(shift), inst=T(inst), cov=torch.as_tensor(covered[sub], device=dev),
                    tpl_extra=T(prep.tpl_sigma_extra[sub]), ngood=T((w > 0).sum(1)),
                    cols=cols, inwin=inwin, scale=scale, first=first, last=last)

    def _poly(self, st: dict, idx: torch.Tensor) -> torch.Tensor:
        """Additive Legendre polynomials (B, n, degree + 1) at window pixels ``idx`` (B, n): x in [-1, 1] over the window."""
        return _legendre(-1 + 2 * idx.to(st["span"].dtype) / st["span"][:, None], self.config.degree)

    def _composite(self, weights: torch.Tensor) -> torch.Tensor:
        """Fourier transform (B, 1, F) of the weighted sum of the templates (two real products)."""
        re = weights @ self._tpl_re
        im = weights @ self._tpl_im
        return torch.complex(re, im)[:, None, :]

    @staticmethod
    def _rows(st: dict, r: torch.Tensor) -> dict:
        """The per-spectrum tensors of rows ``r`` (a sub-batch)."""
        return {k: (v[r] if isinstance(v, torch.Tensor) else v) for k, v in st.items()}

    # ------------------------------------------------------------------ model pieces
    def _stars(self, ft: torch.Tensor, st: dict, kin: torch.Tensor, derivs: bool) -> torch.Tensor:
        """Broadened, shifted templates on the window: ft (1 or B, T, F) -> (B, T, M), or with derivs (B, 3, M).

        Value j is T_conv(j + shift - V/velscale); with ``derivs`` (T must be 1) rows are the template
        and its derivatives with respect to V* and sigma* (km/s). The LOSVD's Fourier transform is
        applied in real arithmetic (torch's complex products are slow on CPU).
        """
        vs = self.config.velscale
        f = self.freq
        B, F = kin.shape[0], f.numel()
        sig_px = torch.sqrt(kin[:, 1] ** 2 + st["tpl_extra"] ** 2) / vs
        sh = st["shift"] - kin[:, 0] / vs
        amp = torch.exp(-2 * (np.pi * f) ** 2 * sig_px[:, None] ** 2)
        ang = 2 * np.pi * f * sh[:, None]
        pr, pi = amp * torch.cos(ang), amp * torch.sin(ang)
        if derivs:
            c = ft[:, 0]
            cr, ci = c.real, c.imag
            br = cr * pr - ci * pi
            bi = cr * pi + ci * pr
            out = torch.empty(B, 3, F, 2, dtype=f.dtype, device=f.device)
            kap = -2 * np.pi * f / vs  # d/dV = -(1/vs) d/dshift: multiply by i kap
            rho = -4 * (np.pi * f) ** 2 * (kin[:, 1:2] / vs**2)  # d/dsigma*
            out[:, 0, :, 0], out[:, 0, :, 1] = br, bi
            out[:, 1, :, 0], out[:, 1, :, 1] = -bi * kap, br * kap
            out[:, 2, :, 0], out[:, 2, :, 1] = br * rho, bi * rho
            prod = torch.view_as_complex(out)
        else:
            rdt = ft.real.dtype
            prod = ft * torch.complex(pr.to(rdt), pi.to(rdt))[:, None, :]
        return torch.fft.irfft(prod, n=self.L, dim=-1)[..., : st["M"]]

    def _gas_widths(self, st: dict, kin: torch.Tensor):
        """Per-line velocity, intrinsic sigma, effective sigma (km/s) of each row (B, 12)."""
        grp1 = self._balmer.bool()
        v = torch.where(grp1, kin[:, 2:3], kin[:, 4:5])
        s = torch.where(grp1, kin[:, 3:4], kin[:, 5:6])
        return v, s, torch.sqrt(s**2 + st["inst"] ** 2)

    def _window_radius(self, st: dict, kin: torch.Tensor) -> torch.Tensor:
        """(B,) half-width in pixels of the line windows each row needs (+-``line_window`` effective sigma)."""
        _, _, sw = self._gas_widths(st, kin)
        wpx = torch.where(st["cov"], sw / self.config.velscale, torch.zeros_like(sw))
        return torch.ceil(self.line_window * wpx.amax(1)) + 2

    def _gas_union(self, st: dict, kin: torch.Tensor, derivs: bool = True):
        """Pixels near the lines and the line profiles there.

        Each covered line owns the pixels closer to it than to any other covered line (1-D cells),
        within +-``line_window`` effective sigma; on its cell it and its close neighbours (the lines of its
        blend: [OII], [OIII], [NII]+Halpha, [SII]) are evaluated. Returns union indices (B, Nu),
        validity (B, Nu) and G, dG/dV, dG/dsigma (B, Nu, 12) (unit-sum pixel-integrated Gaussians).
        """
        vs = self.config.velscale
        step = vs / C_KMS
        dt = kin.dtype
        B = kin.shape[0]
        v, s, sw = self._gas_widths(st, kin)
        cov = st["cov"]
        mu = self._lnw + v / C_KMS  # (B, 12) rest ln(lambda)
        p = (mu - st["x0"][:, None]) / step  # centres in window pixels
        R = int(min(float(self._window_radius(st, kin).max()), st["M"]))
        # cell boundaries: midpoints to the neighbouring covered lines (in wavelength order)
        pc_ = torch.where(cov, p, torch.full_like(p, np.inf))
        ps, order = torch.sort(pc_, 1)
        inf = torch.full((B, 1), np.inf, dtype=dt, device=kin.device)
        prev = torch.cat([-inf, ps[:, :-1]], 1)
        nxt = torch.cat([ps[:, 1:], inf], 1)
        lo_s = torch.where(torch.isfinite(prev), 0.5 * (prev + ps), -inf)
        hi_s = torch.where(torch.isfinite(nxt), 0.5 * (nxt + ps), inf)
        lo = torch.empty_like(p).scatter_(1, order, lo_s)
        hi = torch.empty_like(p).scatter_(1, order, hi_s)
        offs = torch.arange(-R, R + 1, device=kin.device)
        W = offs.numel()
        idx = torch.round(p).long()[:, :, None] + offs  # (B, 12, W)
        fi = idx.to(dt)
        valid = cov[:, :, None] & (fi > lo[:, :, None]) & (fi <= hi[:, :, None]) & (idx >= 0) & (idx < st["M"])
        idx = idx.clamp(0, st["M"] - 1)
        x = st["x0"][:, None, None] + idx.to(dt) * step  # (B, 12, W) rest ln(lambda)
        mates = self._mates  # (12, 3) line indices evaluated on each cell (padded with the cell's own line)
        mm = self._mates_mask  # (12, 3)
        mu_m = mu[:, mates]  # (B, 12, 3)
        width = (sw / C_KMS)[:, mates]
        s_m = s[:, mates]
        live = (cov[:, mates] & mm[None]).to(dt)
        zz = (x[..., None] - mu_m[:, :, None, :]) / (_SQ2 * width[:, :, None, :])  # (B, 12, W, 3)
        h = step / (2 * _SQ2 * width[:, :, None, :])
        a, b_ = zz + h, zz - h
        lv = live[:, :, None, :] * valid[..., None].to(dt)
        G = 0.5 * (torch.erf(a) - torch.erf(b_)) * lv
        dGdV = dGds = None
        if derivs:
            ea, eb = torch.exp(-a * a), torch.exp(-b_ * b_)
            dGdV = (ea - eb) * (-1.0 / (_SQPI * _SQ2 * C_KMS) / width[:, :, None, :]) * lv
            dGds = (b_ * eb - a * ea) * (s_m / (_SQPI * C_KMS**2 * width**2))[:, :, None, :] * lv
        tgt = mates[None, :, None, :].expand(B, -1, W, -1)
        Gd = torch.zeros(B, _NL, W, _NL, dtype=dt, device=kin.device).scatter_add_(3, tgt, G).reshape(B, _NL * W, _NL)
        return idx.reshape(B, -1), valid.reshape(B, -1), Gd, dGdV, dGds

    # ------------------------------------------------------------------ evaluation at fixed kinematics
    #: Rows are evaluated in two groups of similar line-window radius when that saves work: one
    #: broad-line row must not make every row of the batch pay for its wide windows.
    split_overhead = 8.0

    def _evaluate(self, st: dict, kin: torch.Tensor, ft: torch.Tensor, free0, derivs: bool):
        """Profiled fit at kinematics ``kin``: linear weights, chi2 and, with ``derivs``, gradient and GN matrix.

        ``ft`` is (B, 1, F) (composite template; with derivatives) or (T, F) (all templates).
        """
        R = self._window_radius(st, kin)
        n = R.numel()
        Rs, order = torch.sort(R)
        # one split, where it saves the most line-window pixels (a call costs about `overhead` rows)
        k = torch.arange(1, n + 1, device=R.device)
        cost = k * Rs + (n - k) * Rs[-1] + self.split_overhead * Rs[0] * (k < n)
        best = int(cost.argmin()) + 1
        if best >= n:
            return self._evaluate_rows(st, kin, ft, free0, derivs)
        groups = [order[:best], order[best:]]
        parts = [self._evaluate_rows(self._rows(st, g), kin[g], ft[g] if ft.dim() == 3 else ft,
                                     None if free0 is None else free0[g], derivs) for g in groups]
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        out = {}
        for k, v in parts[0].items():
            if not isinstance(v, torch.Tensor):
                out[k] = v
                continue
            ts = [p[k] for p in parts]
            out[k] = torch.cat(ts, 0)[inv]
        return out

    def _star_products(self, st: dict, kin: torch.Tensor, ft: torch.Tensor, derivs: bool, idx: torch.Tensor,
                       chunk: int = 4):
        """Weighted inner products Q (B, nE, nE + np + 1) of the stellar rows E with E, P, y, and E at the
        line pixels ``idx`` (B, nE, Nu). All-template E (B, T, M) is made a few rows at a time."""
        def products(sc, E, ix, buf=None):
            w = sc["w"][:, None, :]
            if buf is None:
                Ew = E * w
            elif E.dtype == buf.dtype:
                Ew = torch.mul(E, w, out=buf[: E.shape[0]])
            else:  # single-precision E: weight in single, then widen (a mixed-type product is 60% slower)
                Ew = buf[: E.shape[0]].copy_(E * w.to(E.dtype))
            Q = torch.cat([Ew @ Ew.transpose(1, 2), Ew @ sc["PYw"]], -1)
            return Q, E.gather(2, ix[:, None, :].expand(-1, E.shape[1], -1)).to(sc["w"].dtype)

        if derivs:
            return products(st, self._stars(ft, st, kin, True), idx)
        B = kin.shape[0]
        buf = torch.empty(min(chunk, B), ft.shape[-2], st["M"], dtype=st["w"].dtype, device=kin.device)
        parts = []
        for r0 in range(0, B, chunk):
            r = slice(r0, r0 + chunk)
            sc = {k: (v[r] if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            fr = ft[None] if ft.dim() == 2 else ft[r]  # shared (T, F) or per-row (B, T, F) templates
            parts.append(products(sc, self._stars(fr, sc, kin[r], False), idx[r], buf))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _evaluate_rows(self, st: dict, kin: torch.Tensor, ft: torch.Tensor, free0, derivs: bool):
        """``_evaluate`` for one group of rows."""
        np_ = st["PYw"].shape[-1] - 1
        B = kin.shape[0]
        y = st["y"]
        idx, valid, G, dGdV, dGds = self._gas_union(st, kin, derivs)
        Q, Eu = self._star_products(st, kin, ft, derivs, idx)
        nE = Q.shape[1]
        ns = 1 if derivs else nE
        w2u = st["w"].gather(1, idx) ** 2 * valid.to(y.dtype)
        yu = y.gather(1, idx)
        Pu = self._poly(st, idx)
        Gw = G * w2u[..., None]
        GtW = Gw.transpose(1, 2)
        GG = GtW @ G
        GE = GtW @ Eu.transpose(1, 2)  # (B, 12, nE)
        GP = GtW @ Pu
        Gy = (GtW @ yu[..., None])[..., 0]
        K = ns + _NL + np_
        dev = kin.device
        H = torch.empty(B, K, K, dtype=y.dtype, device=dev)
        H[:, :ns, :ns] = Q[:, :ns, :ns]
        H[:, :ns, ns : ns + _NL] = GE[:, :, :ns].transpose(1, 2)
        H[:, :ns, ns + _NL :] = Q[:, :ns, nE : nE + np_]
        H[:, ns : ns + _NL, ns : ns + _NL] = GG
        H[:, ns : ns + _NL, ns + _NL :] = GP
        H[:, ns + _NL :, ns + _NL :] = st["PWP"]
        iu = torch.triu_indices(K, K, 1, device=dev)
        H[:, iu[1], iu[0]] = H[:, iu[0], iu[1]]
        bvec = torch.cat([Q[:, :ns, -1], Gy, st["PWy"]], 1)
        constrained = torch.zeros(K, dtype=torch.bool, device=dev)
        constrained[: ns + _NL] = True
        allowed = torch.ones(B, K, dtype=torch.bool, device=dev)
        allowed[:, ns : ns + _NL] = st["cov"]
        if not derivs and "tpl_ok" in st:  # per-row template subsets, padded
            allowed[:, :ns] = st["tpl_ok"]
        x, free, Hinv, kkt = nnls_normal(H, bvec, constrained, allowed, free0)
        chi2 = st["yWy"] - 2 * (x * bvec).sum(1) + (x[:, None, :] @ H @ x[..., None])[:, 0, 0]
        out = dict(x=x, free=free, Hinv=Hinv, chi2=chi2, kkt=kkt)
        if not derivs:
            # A line held at zero by the non-negativity has no entry in Hinv; it gets the variance it
            # would have if freed (the Schur complement given the free columns), so that its flux of
            # 0 comes with an error from which an upper limit follows, as pPXF gives one.
            li = slice(ns, ns + _NL)
            Hl = H[:, :, li]
            cond = torch.diagonal(H[:, li, li], dim1=1, dim2=2) - torch.einsum("bkl,bkm,bml->bl", Hl, Hinv, Hl)
            held = ~free[:, li] & allowed[:, li]
            out["line_var"] = torch.where(held, 1.0 / cond.clamp_min(1e-300),
                                          torch.diagonal(Hinv, dim1=1, dim2=2)[:, li])
            return out
        xs, fl, c = x[:, 0], x[:, 1 : 1 + _NL], x[:, 1 + _NL :]
        # gas derivative vectors (per pixel: sum over the lines of flux x profile derivative), from the
        # compact (B, cell, W, mate) profile derivatives
        fb = (fl * self._balmer)[:, self._mates][:, :, None, :]  # (B, 12, 1, 3)
        ff = (fl * self._forb)[:, self._mates][:, :, None, :]
        Dg = torch.stack([(dGdV * fb).sum(-1), (dGds * fb).sum(-1), (dGdV * ff).sum(-1), (dGds * ff).sum(-1)],
                         -1).reshape(B, -1, 4)  # (B, Nu, 4)
        Dgw = Dg * w2u[..., None]
        # D^T W D (6 x 6): stars (dense), gas (union)
        DtD = torch.empty(B, 6, 6, dtype=y.dtype, device=dev)
        DtD[:, :2, :2] = xs[:, None, None] ** 2 * Q[:, 1:3, 1:3]
        sg = xs[:, None, None] * (Eu[:, 1:3] @ Dgw)  # (B, 2, 4)
        DtD[:, :2, 2:] = sg
        DtD[:, 2:, :2] = sg.transpose(1, 2)
        DtD[:, 2:, 2:] = Dg.transpose(1, 2) @ Dgw
        # A^T W D (K x 6)
        AtD = torch.empty(B, K, 6, dtype=y.dtype, device=dev)
        AtD[:, 0, :2] = xs[:, None] * Q[:, 0, 1:3]  # Q is symmetric in its first ns + nd columns
        AtD[:, 0, 2:] = (Eu[:, 0:1] @ Dgw)[:, 0]
        AtD[:, 1 : 1 + _NL, :2] = xs[:, None, None] * GE[:, :, 1:3]
        AtD[:, 1 : 1 + _NL, 2:] = GtW @ Dg
        AtD[:, 1 + _NL :, :2] = xs[:, None, None] * Q[:, 1:3, nE : nE + np_].transpose(1, 2)
        AtD[:, 1 + _NL :, 2:] = Pu.transpose(1, 2) @ Dgw
        # gradient D^T W (model - y): exact for the profiled chi2 (envelope theorem)
        g_st = xs[:, None] * (xs[:, None] * Q[:, 1:3, 0] + (GE[:, :, 1:3] * fl[..., None]).sum(1)
                              + (Q[:, 1:3, nE : nE + np_] @ c[..., None])[..., 0] - Q[:, 1:3, -1])
        mu_ = xs[:, None] * Eu[:, 0] + (G @ fl[..., None])[..., 0] + (Pu @ c[..., None])[..., 0]
        g_gas = (Dgw * (mu_ - yu)[..., None]).sum(1)
        out["grad"] = torch.cat([g_st, g_gas], 1)
        out["JtJ"] = DtD - AtD.transpose(1, 2) @ Hinv @ AtD
        return out

    # ------------------------------------------------------------------ fitting
    def _fit_batch(self, prep, sub, covered, out, flag, stars_log, gas_log) -> None:
        cfg = self.config
        st = self._setup(prep, sub, covered)
        B, nt = sub.size, self.ntpl
        dev, dt = self.device, self.dtype
        lo = torch.tensor([-cfg.v_bound, cfg.sigma_bounds[0]] * 3, dtype=dt, device=dev)
        hi = torch.tensor([cfg.v_bound, cfg.sigma_bounds[1]] * 3, dtype=dt, device=dev)
        kin = torch.tensor([0.0, cfg.sigma_start, 0.0, cfg.gas_sigma_start, 0.0, cfg.gas_sigma_start],
                           dtype=dt, device=dev).repeat(B, 1)
        grp = torch.as_tensor(_LINE_GROUP, device=dev)
        has_group = torch.stack([torch.ones(B, dtype=torch.bool, device=dev)] + [
            (st["cov"] & (grp == g)).any(1) for g in (1, 2)], 1).repeat_interleave(2, 1)
        for outer, iters in enumerate(self.lm_iters):
            if outer == 0:
                full = self._start(st, kin)
            elif outer == 1:
                full = self._full(st, kin, full["free"])
            else:
                full = self._final(st, kin, full["free"])
            at = kin.clone()
            kin, converged, JtJ = self._lm(st, kin, self._composite(full["x"][:, :nt]), lo, hi, has_group, iters)
        # the closing linear step at the final kinematics: over the templates active in the last one,
        # and (after a restricted step) only for the rows whose kinematics moved since it
        moved = (kin != at).any(1) if len(self.lm_iters) > 2 else torch.ones(B, dtype=torch.bool, device=dev)
        full = self._final_rows(st, kin, full, moved)
        x, Hinv, chi2 = full["x"], full["Hinv"], full["chi2"]
        dof = st["ngood"] - has_group.sum(1).to(dt)  # as pPXF: good pixels - kinematic parameters
        red = chi2 / dof.clamp_min(1)
        # kinematic errors from the Gauss-Newton matrix, scaled by sqrt(reduced chi2) as for pPXF
        hg = has_group.to(dt)
        JtJ = JtJ * hg[:, :, None] * hg[:, None, :] + torch.diag_embed(1 - hg)
        kerr = torch.sqrt(torch.diagonal(torch.linalg.pinv(JtJ), dim1=1, dim2=2).clamp_min(0) * red[:, None])
        ferr = torch.sqrt(full["line_var"].clamp_min(0) * red[:, None])
        # best-fit models on the window: stars (templates + polynomial) and gas (scattered from the line cells)
        comp_ft = self._composite(x[:, :nt])
        pix = torch.arange(st["M"], device=dev)[None, :].expand(B, -1)
        stars = self._stars(comp_ft, st, kin, False)[:, 0] + (self._poly(st, pix) @ x[:, nt + _NL :, None])[..., 0]
        idx, valid, G, _, _ = self._gas_union(st, kin, derivs=False)
        gas_u = (G @ x[:, nt : nt + _NL, None])[..., 0] * valid.to(dt)
        gas = torch.zeros_like(st["y"]).scatter_add_(1, idx, gas_u)
        self._store(prep, sub, st, kin, kerr, x[:, nt : nt + _NL], ferr, red, converged & full["kkt"], has_group,
                    stars, gas, out, flag, stars_log, gas_log)

    def _start(self, st: dict, kin: torch.Tensor) -> dict:
        """The first linear step, over ``start_templates`` only; weights and active set for every template."""
        si = torch.as_tensor(self.start_templates, device=self.device)
        k, nt, B = si.numel(), self.ntpl, kin.shape[0]
        out = self._evaluate(st, kin, self.tpl_ft_full[si], None, derivs=False)
        x = torch.zeros(B, nt, dtype=out["x"].dtype, device=self.device).index_copy_(1, si, out["x"][:, :k])
        free = torch.zeros(B, nt, dtype=torch.bool, device=self.device).index_copy_(1, si, out["free"][:, :k])
        return dict(out, x=torch.cat([x, out["x"][:, k:]], 1), free=torch.cat([free, out["free"][:, k:]], 1))

    def _full(self, st: dict, kin: torch.Tensor, free0) -> dict:
        """Linear step with every template at kinematics ``kin``."""
        return self._evaluate(st, kin, self.tpl_ft_full, free0, derivs=False)

    def _final(self, st: dict, kin: torch.Tensor, free: torch.Tensor) -> dict:
        """The last linear step, at the final kinematics, over the templates active in the previous one.

        An active-set continuation: the kinematics moved by a fraction of their errors since the last
        all-template step, so its active templates are kept and the inactive ones stay at zero.
        Returns the same keys as ``_full``, with weights for every template.
        """
        nt = self.ntpl
        sel = free[:, :nt]
        k = max(1, int(sel.sum(1).max()))
        tsel = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :k]  # active first, then padding
        ok = sel.gather(1, tsel)
        out = self._evaluate(dict(st, tpl_ok=ok), kin, self.tpl_ft_full[tsel], torch.cat([ok, free[:, nt:]], 1),
                             derivs=False)
        xs = out["x"]
        weights = torch.zeros(kin.shape[0], nt, dtype=xs.dtype, device=xs.device).scatter_(1, tsel, xs[:, :k] * ok)
        B, K = xs.shape
        Hinv = torch.zeros(B, nt + K - k, nt + K - k, dtype=xs.dtype, device=xs.device)
        Hinv[:, nt:, nt:] = out["Hinv"][:, k:, k:]  # lines and polynomial (template block not needed)
        fs = out["free"]
        free_all = torch.zeros(B, nt, dtype=torch.bool, device=xs.device).scatter_(1, tsel, fs[:, :k] & ok)
        return dict(out, x=torch.cat([weights, xs[:, k:]], 1), Hinv=Hinv, free=torch.cat([free_all, fs[:, k:]], 1))

    def _final_rows(self, st: dict, kin: torch.Tensor, last: dict, rows: torch.Tensor) -> dict:
        """``_final`` for ``rows`` (bool, B); the other rows keep ``last`` (a restricted step at their kinematics)."""
        if bool(rows.all()):
            return self._final(st, kin, last["free"])
        out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in last.items()}
        r = torch.nonzero(rows).flatten()
        if r.numel():
            new = self._final(self._rows(st, r), kin[r], last["free"][r])
            for k in ("x", "Hinv", "chi2", "kkt", "free", "line_var"):
                out[k][r] = new[k]
        return out

    def _lm(self, st, kin, comp_ft, lo, hi, has_group, iters: int):
        """Batched Levenberg-Marquardt on the six kinematic parameters; converged rows leave the batch."""
        B = kin.shape[0]
        dt, dev = kin.dtype, kin.device
        eye = torch.eye(6, dtype=dt, device=dev)
        ev = self._evaluate(st, kin, comp_ft, None, derivs=True)
        chi2, grad, JtJ, free = ev["chi2"], ev["grad"], ev["JtJ"], ev["free"]
        dof = (st["ngood"] - 20).clamp_min(1)
        rscale = torch.clamp(chi2 / dof, min=1.0)
        tol = self.chi2_tol * rscale
        lam = torch.full((B,), self.lm_lambda0, dtype=dt, device=dev)
        converged = torch.zeros(B, dtype=torch.bool, device=dev)
        cur, sc, comp_c = torch.arange(B, device=dev), st, comp_ft
        for it in range(iters + 1):
            # rows still iterating after `relax_after` steps get a tolerance that grows towards the final one
            relax = min(self.relax_rate ** max(0, it - self.relax_after), self.chi2_tol_final / self.chi2_tol)
            # parameters at a bound with the gradient pushing outwards are held there
            held = ((kin <= lo) & (grad > 0)) | ((kin >= hi) & (grad < 0)) | ~has_group
            mfree = (~held).to(dt)
            A = JtJ * mfree[:, :, None] * mfree[:, None, :] + torch.diag_embed(1 - mfree)
            d = torch.diagonal(A, dim1=1, dim2=2).clamp_min(1e-12)
            gm = grad * mfree
            Ainv = torch.linalg.inv(A + 1e-12 * eye)
            gn = (Ainv @ gm[..., None])[..., 0]  # the Gauss-Newton step is -gn
            pred = (gm * gn).sum(1)
            # or every parameter is within a fraction of its error of where the Gauss-Newton step would take it
            err = torch.sqrt(torch.diagonal(Ainv, dim1=1, dim2=2).clamp_min(1e-30) * rscale[:, None])
            close = ((gn.abs() <= self.step_tol.to(gn) * err) | held).all(1)
            converged = converged | (pred < tol * relax) | close
            act = torch.nonzero(~converged).flatten()
            if act.numel() == 0:
                break
            if it == iters:
                converged = converged | (pred < tol * self.chi2_tol_final / self.chi2_tol)
                break
            # evaluate on `cur` (a superset of the active rows): re-gathering the per-row tensors only
            # when enough rows have converged to pay for the copy
            if act.numel() < 0.75 * cur.numel():
                cur, sc, comp_c = act, self._rows(st, act), comp_ft[act]
            live = ~converged[cur]
            Aa = A[cur] + torch.diag_embed(lam[cur, None] * d[cur]) + 1e-12 * eye
            stp = -torch.linalg.solve(Aa, gm[cur][..., None])[..., 0] * mfree[cur] * live[:, None]
            new = torch.minimum(torch.maximum(kin[cur] + stp, lo), hi)
            en = self._evaluate(sc, new, comp_c, free[cur], derivs=True)
            better = (en["chi2"] < chi2[cur]) & live
            ab = cur[better]
            kin[ab] = new[better]
            chi2[ab] = en["chi2"][better]
            grad[ab] = en["grad"][better]
            JtJ[ab] = en["JtJ"][better]
            free[ab] = en["free"][better]
            lam[cur] = torch.where(live, torch.where(better, lam[cur] * 0.3, lam[cur] * 10).clamp(1e-7, 1e10), lam[cur])
            # no step lowers chi2 even with a tiny trust region: a (numerical) minimum
            converged[cur[live & (~better) & (lam[cur] >= 1e10)]] = True
        return kin, converged, JtJ

    def _store(self, prep, sub, st, kin, kerr, flux, ferr, red, converged, has_group, stars, gas,
               out, flag, stars_log, gas_log) -> None:
        cfg = self.config
        kin, kerr, flux, ferr = (a.detach().cpu().numpy() for a in (kin, kerr, flux, ferr))
        red, converged, has_group = red.cpu().numpy(), converged.cpu().numpy(), has_group.cpu().numpy()
        stars, gas = stars.cpu().numpy(), gas.cpu().numpy()
        lo, hi = cfg.sigma_bounds
        zz = prep.z[sub]
        dlam_obs = _LINE_WAVE[None, :] * (1 + zz[:, None]) * (np.exp(cfg.velscale / C_KMS) - 1)
        scale = st["scale"]
        for k, i in enumerate(sub):
            if not (np.all(np.isfinite(kin[k])) and np.isfinite(red[k]) and np.all(np.isfinite(flux[k]))):
                flag[i] |= FLAGS["FIT_FAILED"]
                continue
            if not converged[k]:
                # fluxes, errors, chi2 and models all come from the unconverged kinematics: none is a
                # measurement, so every fitted column (and Gas_Av, derived from the fluxes) stays NULL
                flag[i] |= FLAGS["NOT_CONVERGED"]
                continue
            win = st["inwin"][k]
            c = st["cols"][k, win]
            s = kin[k, 1]
            if not kinematics_constrained(kin[k, 0], kerr[k, 0], kerr[k, 1], cfg):
                flag[i] |= FLAGS["STARS_UNCONSTRAINED"]
            elif s <= lo * 1.01 or s >= hi * 0.99:
                flag[i] |= FLAGS["SIGMA_AT_BOUND"]
                out["V_star"][i], out["V_star_err"][i] = kin[k, 0], kerr[k, 0]
            else:
                out["VelDisp"][i], out["VelDisp_err"][i] = s, kerr[k, 1]
                lam = np.exp(prep.ln_lam[c]) / (1 + zz[k])
                inst = np.median(prep.fwhm_rest[i, c] / 2.3548 / lam) * C_KMS
                if s < 0.5 * inst:
                    flag[i] |= FLAGS["SIGMA_UNRESOLVED"]
                out["V_star"][i], out["V_star_err"][i] = kin[k, 0], kerr[k, 0]
            for g, tag in ((1, "balmer"), (2, "forbidden")):
                p = 2 * g
                if has_group[k, p] and gas_sigma_at_upper_bound(kin[k, p + 1], cfg):
                    flag[i] |= FLAGS["GAS_SIGMA_AT_UPPER_BOUND"]
                if (has_group[k, p] and lo * 1.01 < kin[k, p + 1] < hi * 0.99
                        and kinematics_constrained(kin[k, p], kerr[k, p], kerr[k, p + 1], cfg)):
                    out[f"V_gas_{tag}"][i], out[f"V_gas_{tag}_err"][i] = kin[k, p], kerr[k, p]
                    out[f"Sigma_gas_{tag}"][i], out[f"Sigma_gas_{tag}_err"][i] = kin[k, p + 1], kerr[k, p + 1]
            for j, nm in enumerate(LINE_NAMES):
                out[f"{nm}_Flux"][i] = flux[k, j] * scale[k] * dlam_obs[k, j]
                out[f"{nm}_Flux_err"][i] = ferr[k, j] * scale[k] * dlam_obs[k, j]
            out["PPXF_Chi2"][i] = red[k]
            stars_log[i, c] = stars[k, win] * scale[k]
            gas_log[i, c] = gas[k, win] * scale[k]
