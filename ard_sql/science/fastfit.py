"""Fast mode: a batched pPXF-like fitter in torch (CPU, or a GPU when present).

Same physics as ``kinematics.ReferenceFitter`` and the same pixels (``kinematics.prepare``):
templates on a ln(lambda) grid convolved with a Gaussian LOSVD through its analytic
Fourier transform (as pPXF does), an additive Legendre polynomial, the 12 gas lines
as pixel-integrated Gaussians in two kinematic groups (Balmer, forbidden), and
non-negative template and line weights (polynomial free), for a batch of spectra at once.

Algorithm (per batch, all spectra in parallel):

1. linear step: at fixed kinematics, solve the bounded least squares for all template,
   line and polynomial weights (batched active-set on the normal equations);
2. kinematic step: with the stellar mix frozen into one composite template, a
   Levenberg-Marquardt search over (V*, sigma*, V_Balmer, sigma_Balmer, V_forb, sigma_forb)
   with the linear weights profiled out at every evaluation (variable projection; the
   Jacobian by finite differences, six extra evaluations per step);
3. repeat 1-2 twice, then a final linear step gives fluxes, their errors and the models.

Errors: kinematics from the LM Jacobian, (J^T J)^-1 x reduced chi2; fluxes from the
covariance of the final linear solve x reduced chi2 (pPXF's formal errors x sqrt(chi2)).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ard_sql.science.kinematics import (
    C_KMS, FLAGS, LINE_NAMES, LINES, FitConfig, KinematicsResult, empty_columns, finalize_flags, line_coverage,
    model_to_linear, prepare, resample_templates,
)

_LINE_WAVE = np.array([LINES[nm][0] for nm in LINE_NAMES])
_LINE_GROUP = np.array([LINES[nm][1] for nm in LINE_NAMES])  # 1 Balmer, 2 forbidden


def _legendre(x: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree at x (..., M) -> (..., M, degree+1)."""
    out = [torch.ones_like(x), x]
    for k in range(1, degree):
        out.append(((2 * k + 1) * x * out[k] - k * out[k - 1]) / (k + 1))
    return torch.stack(out[: degree + 1], -1)


def bounded_lstsq(A: torch.Tensor, b: torch.Tensor, w: torch.Tensor, lower_free: torch.Tensor, iters: int = 60):
    """Batched min ||w (A x - b)||^2 with x_k >= 0 where ``lower_free[k]`` is False (active-set).

    A (B, M, K), b (B, M), w (B, M); returns x (B, K), H^-1 on the free set (B, K, K), chi2 (B,).
    """
    Aw = A * w[..., None]
    bw = b * w
    H = Aw.transpose(1, 2) @ Aw
    g = (Aw.transpose(1, 2) @ bw[..., None])[..., 0]
    B, K = g.shape
    scale = torch.sqrt(torch.diagonal(H, dim1=1, dim2=2).clamp_min(1e-30))
    Hs = H / scale[:, :, None] / scale[:, None, :]
    gs = g / scale
    eye = torch.eye(K, dtype=A.dtype, device=A.device)
    free = torch.ones(B, K, dtype=torch.bool, device=A.device)
    constrained = ~lower_free.to(A.device)
    x = torch.zeros_like(gs)
    for _ in range(iters):
        fm = free.to(A.dtype)
        Hf = Hs * fm[:, :, None] * fm[:, None, :] + eye * (1 - fm)[:, None, :] + 1e-10 * eye
        x = torch.linalg.solve(Hf, (gs * fm)[..., None])[..., 0] * fm
        neg = (x < 0) & constrained & free
        grad = gs - (Hs @ x[..., None])[..., 0]  # -gradient of 0.5 x'Hx - g'x
        add = (~free) & (grad > 1e-9)
        if not (neg.any() or add.any()):
            break
        # drop every negative constrained weight at once; when none, re-admit the worst KKT violator
        has_neg = neg.any(1)
        free &= ~neg
        best = torch.where(add, grad, torch.zeros_like(grad)).argmax(1)
        readd = (~has_neg) & add.any(1)
        free[readd, best[readd]] = True
    x = x.clamp_min(0) * constrained + x * (~constrained)
    fm = free.to(A.dtype)
    Hf = Hs * fm[:, :, None] * fm[:, None, :] + eye * (1 - fm)[:, None, :] + 1e-10 * eye
    cov = torch.linalg.inv(Hf) * fm[:, :, None] * fm[:, None, :] / scale[:, :, None] / scale[:, None, :]
    xs = x / scale
    r = (A @ xs[..., None])[..., 0] - b
    chi2 = ((r * w) ** 2).sum(1)
    return xs, cov, chi2


class FastFitter:
    """Batched fitter; ``fit`` has the same signature and output as ``ReferenceFitter.fit``."""

    def __init__(self, template_path, config: FitConfig | None = None, device: str | None = None,
                 batch_size: int = 32, dtype=torch.float64):
        from ard_sql.science.templates import load_templates

        self.config = config or FitConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.batch_size = batch_size
        tpl = load_templates(template_path)
        self.template_fwhm = float(np.median(tpl.fwhm))
        flux, self.ln_lam_tpl = resample_templates(tpl.lam, tpl.flux, self.config.velscale)
        nt = flux.shape[0]
        self.L = int(2 ** np.ceil(np.log2(nt + 256)))
        # pad by a linear ramp from the last value back to the first: a smooth periodic extension for the FFT
        ramp = np.linspace(0, 1, self.L - nt)[:, None]
        padded = np.vstack([flux, flux[-1] * (1 - ramp) + flux[0] * ramp])
        self.tpl_ft = torch.fft.rfft(torch.as_tensor(padded.T, dtype=dtype, device=self.device), dim=-1)  # (T, F)
        self.freq = torch.fft.rfftfreq(self.L, device=self.device).to(dtype)  # cycles / pixel
        self.ntpl = flux.shape[1]

    # ------------------------------------------------------------------ model pieces
    def _stars(self, ft: torch.Tensor, shift: torch.Tensor, sigma_px: torch.Tensor, M: int) -> torch.Tensor:
        """Broadened, shifted templates: ft (B, T, F) -> (B, M, T); value j is T_conv(j + shift)."""
        f = self.freq
        phase = torch.exp(torch.complex(-2 * (np.pi * f) ** 2 * sigma_px[:, None] ** 2,
                                        2 * np.pi * f * shift[:, None]))
        out = torch.fft.irfft(ft * phase[:, None, :], n=self.L, dim=-1)[..., :M]
        return out.transpose(1, 2)

    def _gas(self, x_rest: torch.Tensor, v: torch.Tensor, s: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
        """Pixel-integrated unit-sum Gaussians: x_rest (B, M) ln(lam_rest); v, s (B, 12) km/s; inst (B, 12) km/s."""
        step = self.config.velscale / C_KMS
        mu = torch.as_tensor(np.log(_LINE_WAVE), dtype=self.dtype, device=self.device) + v / C_KMS
        width = torch.sqrt(s**2 + inst**2) / C_KMS
        z = (x_rest[:, :, None] - mu[:, None, :]) / (np.sqrt(2) * width[:, None, :])
        h = step / (2 * np.sqrt(2) * width[:, None, :])
        return 0.5 * (torch.erf(z + h) - torch.erf(z - h))

    def _design(self, st, kin, ft):
        """Design matrix (B, M, K) for kinematics kin (B, 6) = V*, s*, Vb, sb, Vf, sf."""
        vs = self.config.velscale
        sig_star = torch.sqrt(kin[:, 1] ** 2 + st["tpl_extra"] ** 2) / vs
        stars = self._stars(ft, st["shift"] - kin[:, 0] / vs, sig_star, st["M"])
        grp = st["group"]
        v = torch.where(grp == 1, kin[:, 2:3], kin[:, 4:5])
        s = torch.where(grp == 1, kin[:, 3:4], kin[:, 5:6])
        gas = self._gas(st["x_rest"], v, s, st["inst"]) * st["covered"][:, None, :]
        return torch.cat([stars, gas, st["poly"]], -1)

    # ------------------------------------------------------------------ fitting
    def fit(self, wave, flux, ivar, mask, lsf_sigma, z) -> KinematicsResult:
        """Fit every spectrum of the batch; never raises for a bad spectrum (NULLs + flag instead)."""
        t0 = time.perf_counter()
        prep = prepare(wave, flux, ivar, mask, lsf_sigma, z, self.template_fwhm, self.config)
        n, m = prep.flux.shape
        cols = empty_columns(n)
        flag = prep.flag.copy()
        covered = line_coverage(prep, self.config)
        stars_log = np.full((n, m), np.nan)
        gas_log = np.full((n, m), np.nan)
        idx = np.flatnonzero(prep.usable)
        for b0 in range(0, idx.size, self.batch_size):
            sub = idx[b0 : b0 + self.batch_size]
            try:
                self._fit_batch(prep, sub, covered, cols, flag, stars_log, gas_log)
            except Exception:  # noqa: BLE001 - a failed batch is NULLs + flags, never a crashed build
                flag[sub] |= FLAGS["FIT_FAILED"]
                for v in cols.values():
                    v[sub] = np.nan
        covered &= ~(flag & FLAGS["FIT_FAILED"]).astype(bool)[:, None]
        finalize_flags(cols, flag, covered)
        return KinematicsResult(cols, flag, model_to_linear(prep.ln_lam, stars_log, wave),
                                model_to_linear(prep.ln_lam, gas_log, wave), time.perf_counter() - t0)

    def _setup(self, prep, sub, covered):
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
        scale = np.array([np.median(prep.flux[i, prep.good[i]]) for i in sub])
        scale = np.where(scale > 0, scale, 1.0)
        y = np.where(inwin, prep.flux[rows, cols], 0.0) / scale[:, None]
        w = w * scale[:, None]
        zz = prep.z[sub]
        x_rest = prep.ln_lam[cols] - np.log1p(zz)[:, None]
        shift = (prep.ln_lam[first] - np.log1p(zz) - self.ln_lam_tpl[0]) / step
        # Legendre x in [-1, 1] over each spectrum's window, as pPXF over its input array
        xl = np.where(inwin, -1 + 2 * j / np.maximum(last - first, 1)[:, None], 0.0)
        lam_rest = np.exp(x_rest)
        inst = np.empty((sub.size, len(LINES)))
        for k, i in enumerate(sub):
            fw = np.interp(_LINE_WAVE, lam_rest[k, inwin[k]], prep.fwhm_rest[i, cols[k, inwin[k]]])
            inst[k] = fw / 2.3548 / _LINE_WAVE * C_KMS
        T = lambda a: torch.as_tensor(a, dtype=dt, device=dev)  # noqa: E731
        poly = _legendre(T(xl), cfg.degree) * T(inwin)[..., None]
        st = dict(M=M, y=T(y), w=T(w), x_rest=T(x_rest), shift=T(shift), inst=T(inst), poly=poly,
                  covered=T(covered[sub]), group=torch.as_tensor(_LINE_GROUP, device=dev)[None, :],
                  tpl_extra=T(prep.tpl_sigma_extra[sub]), cols=cols, inwin=inwin, scale=scale)
        return st

    def _fit_batch(self, prep, sub, covered, out, flag, stars_log, gas_log) -> None:
        cfg = self.config
        st = self._setup(prep, sub, covered)
        B, nt, ng, npoly = sub.size, self.ntpl, len(LINES), cfg.degree + 1
        dev, dt = self.device, self.dtype
        lower_free = torch.zeros(nt + ng + npoly, dtype=torch.bool)
        lower_free[nt + ng:] = True
        lo = torch.tensor([-cfg.v_bound, cfg.sigma_bounds[0]] * 3, dtype=dt, device=dev)
        hi = torch.tensor([cfg.v_bound, cfg.sigma_bounds[1]] * 3, dtype=dt, device=dev)
        kin = torch.tensor([0.0, cfg.sigma_start, 0.0, cfg.gas_sigma_start, 0.0, cfg.gas_sigma_start],
                           dtype=dt, device=dev).repeat(B, 1)
        has_group = torch.stack([torch.ones(B, dtype=torch.bool, device=dev)] + [
            ((st["covered"] > 0) & (st["group"] == g)).any(1) for g in (1, 2)], 1).repeat_interleave(2, 1)
        full_ft = self.tpl_ft[None].expand(B, -1, -1)
        converged = torch.zeros(B, dtype=torch.bool, device=dev)
        for outer in range(3):
            A = self._design(st, kin, full_ft)
            x, _, _ = bounded_lstsq(A, st["y"], st["w"], lower_free)
            comp_ft = (x[:, :nt, None].to(torch.complex128 if dt == torch.float64 else torch.complex64) * self.tpl_ft[None]).sum(1, keepdim=True)
            kin, converged, J, chi2 = self._lm(st, kin, comp_ft, lo, hi, has_group, iters=12 if outer == 0 else 8)
        A = self._design(st, kin, full_ft)
        x, cov, chi2 = bounded_lstsq(A, st["y"], st["w"], lower_free)
        dof = (st["w"] > 0).sum(1).to(dt) - (x.abs() > 0).sum(1).to(dt) - 6
        red = chi2 / dof.clamp_min(1)
        # kinematic errors: Jacobian of the profiled residual, scaled by sqrt(reduced chi2) as for pPXF
        JtJ = J.transpose(1, 2) @ J + torch.diag_embed((~has_group).to(dt))
        kerr = torch.sqrt(torch.diagonal(torch.linalg.pinv(JtJ), dim1=1, dim2=2).clamp_min(0) * red[:, None])
        model = (A @ x[..., None])[..., 0]
        gas_model = (A[..., nt : nt + ng] @ x[:, nt : nt + ng, None])[..., 0]
        ferr = torch.sqrt(torch.diagonal(cov, dim1=1, dim2=2)[:, nt : nt + ng].clamp_min(0) * red[:, None])
        self._store(prep, sub, st, kin, kerr, x[:, nt : nt + ng], ferr, red, converged, has_group, model, gas_model,
                    out, flag, stars_log, gas_log)

    def _profiled(self, st, kin, comp_ft):
        """Weighted residual with the linear weights solved (composite template, lines, polynomial)."""
        A = self._design(st, kin, comp_ft)
        lower_free = torch.zeros(A.shape[-1], dtype=torch.bool)
        lower_free[1 + len(LINES):] = True
        x, _, chi2 = bounded_lstsq(A, st["y"], st["w"], lower_free, iters=15)
        return ((A @ x[..., None])[..., 0] - st["y"]) * st["w"], chi2

    def _lm(self, st, kin, comp_ft, lo, hi, has_group, iters: int):
        """Batched Levenberg-Marquardt on the six kinematic parameters."""
        B = kin.shape[0]
        dt = kin.dtype
        lam = torch.full((B,), 1e-3, dtype=dt, device=kin.device)
        r, chi2 = self._profiled(st, kin, comp_ft)
        h = torch.tensor([1.0, 1.0] * 3, dtype=dt, device=kin.device)  # km/s finite-difference steps
        converged = torch.zeros(B, dtype=torch.bool, device=kin.device)
        J = None
        for _ in range(iters):
            cols = []
            for p in range(6):
                kp = kin.clone()
                kp[:, p] = kp[:, p] + h[p] * torch.where(kp[:, p] + h[p] > hi[p], -1.0, 1.0)
                rp, _ = self._profiled(st, kp, comp_ft)
                cols.append((rp - r) / (kp[:, p] - kin[:, p])[:, None])
            J = torch.stack(cols, -1) * has_group[:, None, :]
            JtJ = J.transpose(1, 2) @ J
            g = (J.transpose(1, 2) @ r[..., None])[..., 0]
            diag = torch.diagonal(JtJ, dim1=1, dim2=2)
            Hd = JtJ + torch.diag_embed(lam[:, None] * diag + (~has_group).to(dt) + 1e-12)
            step = -torch.linalg.solve(Hd, g[..., None])[..., 0] * has_group
            new = torch.minimum(torch.maximum(kin + step, lo), hi)
            rn, chi2n = self._profiled(st, new, comp_ft)
            better = chi2n < chi2
            moved = (new - kin).abs().amax(1)
            converged = converged | (better & (moved < 0.5)) | ((~better) & (moved < 0.05))
            kin = torch.where(better[:, None], new, kin)
            r = torch.where(better[:, None], rn, r)
            chi2 = torch.where(better, chi2n, chi2)
            lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-6, 1e6)
        return kin, converged, J, chi2

    def _store(self, prep, sub, st, kin, kerr, flux, ferr, red, converged, has_group, model, gas_model,
               out, flag, stars_log, gas_log) -> None:
        cfg = self.config
        kin, kerr, flux, ferr = (a.detach().cpu().numpy() for a in (kin, kerr, flux, ferr))
        red, converged, has_group = red.cpu().numpy(), converged.cpu().numpy(), has_group.cpu().numpy()
        model, gas_model = model.cpu().numpy(), gas_model.cpu().numpy()
        lo, hi = cfg.sigma_bounds
        zz = prep.z[sub]
        dlam_obs = _LINE_WAVE[None, :] * (1 + zz[:, None]) * (np.exp(cfg.velscale / C_KMS) - 1)
        scale = st["scale"]
        for k, i in enumerate(sub):
            if not np.all(np.isfinite(kin[k])) or not np.isfinite(red[k]):
                flag[i] |= FLAGS["FIT_FAILED"]
                continue
            if not converged[k]:
                flag[i] |= FLAGS["NOT_CONVERGED"]
                continue
            s = kin[k, 1]
            if s <= lo * 1.01 or s >= hi * 0.99:
                flag[i] |= FLAGS["SIGMA_AT_BOUND"]
            else:
                out["VelDisp"][i], out["VelDisp_err"][i] = s, kerr[k, 1]
                win = st["inwin"][k]
                lam = np.exp(prep.ln_lam[st["cols"][k, win]]) / (1 + zz[k])
                inst = np.median(prep.fwhm_rest[i, st["cols"][k, win]] / 2.3548 / lam) * C_KMS
                if s < 0.5 * inst:
                    flag[i] |= FLAGS["SIGMA_UNRESOLVED"]
            out["V_star"][i], out["V_star_err"][i] = kin[k, 0], kerr[k, 0]
            for g, tag in ((1, "balmer"), (2, "forbidden")):
                p = 2 * g
                if has_group[k, p] and lo * 1.01 < kin[k, p + 1] < hi * 0.99:
                    out[f"V_gas_{tag}"][i], out[f"V_gas_{tag}_err"][i] = kin[k, p], kerr[k, p]
                    out[f"Sigma_gas_{tag}"][i], out[f"Sigma_gas_{tag}_err"][i] = kin[k, p + 1], kerr[k, p + 1]
            for j, nm in enumerate(LINE_NAMES):
                out[f"{nm}_Flux"][i] = flux[k, j] * scale[k] * dlam_obs[k, j]
                out[f"{nm}_Flux_err"][i] = ferr[k, j] * scale[k] * dlam_obs[k, j]
            out["PPXF_Chi2"][i] = red[k]
            win = st["inwin"][k]
            c = st["cols"][k, win]
            stars_log[i, c] = (model[k, win] - gas_model[k, win]) * scale[k]
            gas_log[i, c] = gas_model[k, win] * scale[k]
