"""The compiled inner loop of :mod:`ard_sql.science.lick` (numba).

The mathematics is documented in :mod:`ard_sql.science.lick`; this module does it in one
pass per spectrum over the pixels of the bands only, without a temporary array per band:

* the pixels of the bands' regions are read once: good/bad, variance, bad pixels filled
  by linear interpolation between their nearest good neighbours in the region;
* each band integral of the piecewise-linear spectrum is a sum over the band's nodes of
  the exact hat-function weights (partial pixels at the edges included);
* an index's variance is sum_i D_i^2 var_i for its gradient D with respect to the
  pixels, accumulated from per-band sums (the bands of one index overlap only in a few
  nodes, whose cross terms are added explicitly); a filled bad pixel passes its gradient
  to the two good pixels it was made from, a sparse correction;
* <Fe> and [MgFe]' need the covariance of Fe5270 and Fe5335, whose bands overlap: it is
  summed pointwise over the overlap.

A numpy formulation of the same algebra (dense per-band weight matrices, one per index)
ran at ~200 us per spectrum; this kernel at ~18 us (bench/bench_lick.py).

Layout of ``bands``: (n_index, 3, 2) rest-frame vacuum edges, rows blue, red, central
(central unused by a break); ``kinds``: 0 break, 1 equivalent width; ``segments``:
(n, 2) rest-frame regions that hold every band, sorted (pixels outside are never read).
"""

from __future__ import annotations

import numba
import numpy as np

BREAK, EW = 0, 1
# Reassociation and fused multiply-add, but no finite-math assumptions: NaN checks must stay.
_FAST = {"reassoc", "contract"}
# Gradient parameters of one index at one spectrum (see _grad_at).
_P_BLO, _P_BHI, _P_RLO, _P_RHI, _P_CLO, _P_CHI, _P_A, _P_B, _P_FB, _P_FR, _P_MB, _P_MR, _P_Z1 = range(13)
_NPAR = 13
#: ``Lick_flag`` bit set when Mgb x (0.72 Fe5270 + 0.28 Fe5335) is not positive (``lick.FLAGS``): after the 3 x 8
#: bits of the indices.
MGFE_NOT_POSITIVE_BIT = 24


@numba.njit(cache=True, inline="always", fastmath=_FAST, error_model="numpy")
def _hat_cdf(u: float, xl: float, xc: float, xr: float) -> float:
    """Integral up to ``u`` of the hat function of node ``xc`` (an absent half has zero width)."""
    out = 0.0
    hl = xc - xl
    if hl > 0.0:
        v = min(max(u, xl), xc)
        out += (v - xl) * (v - xl) / (2.0 * hl)
    hr = xr - xc
    if hr > 0.0:
        v = min(max(u, xc), xr)
        out += 0.5 * hr - (xr - v) * (xr - v) / (2.0 * hr)
    return out


@numba.njit(cache=True, inline="always", fastmath=_FAST, error_model="numpy")
def _weight(x: np.ndarray, i: int, lo: float, hi: float) -> float:
    """Exact integral over [lo, hi] of node i's hat function (its weight in the band integral)."""
    npix = x.size
    xc = x[i]
    xl = x[i - 1] if i > 0 else xc
    xr = x[i + 1] if i < npix - 1 else xc
    if xl >= lo and xr <= hi:  # the whole hat lies inside the band
        return 0.5 * (xr - xl)
    if xr <= lo or xl >= hi:
        return 0.0
    return _hat_cdf(hi, xl, xc, xr) - _hat_cdf(lo, xl, xc, xr)


@numba.njit(cache=True, error_model="numpy")
def _lookup(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A table for :func:`_search`: the first node at or above x[0] + j * step, step <= every pixel."""
    npix = x.size
    step = np.inf
    for i in range(npix - 1):
        step = min(step, x[i + 1] - x[i])
    step = max(step, (x[npix - 1] - x[0]) / (20 * npix))  # an irregular grid walks a little further
    nlut = int((x[npix - 1] - x[0]) / step) + 2
    lut = np.empty(nlut, dtype=np.int64)
    i = 0
    for j in range(nlut):
        v = x[0] + j * step
        while i < npix and x[i] < v:
            i += 1
        lut[j] = i
    return lut, x[0], 1.0 / step


@numba.njit(cache=True, inline="always", error_model="numpy")
def _search(x: np.ndarray, grid: tuple, v: float) -> int:
    """np.searchsorted(x, v) (left) from the table of :func:`_lookup`: one or two steps, no bisection."""
    lut, x0, inv_step = grid
    if not v > x0:
        return 0
    j = min(int((v - x0) * inv_step), lut.size - 1)
    i = lut[j]
    while i < x.size and x[i] < v:
        i += 1
    return i


@numba.njit(cache=True, inline="always", error_model="numpy")
def _node_range(x: np.ndarray, grid: tuple, lo: float, hi: float) -> tuple[int, int]:
    """Nodes [a, b) whose hat overlaps (lo, hi)."""
    a = max(_search(x, grid, lo) - 1, 0)
    b = min(_search(x, grid, hi) + 1, x.size)
    return a, b


@numba.njit(cache=True, inline="always", error_model="numpy")
def _interior(a: int, b: int) -> tuple[int, int, int, int]:
    """Split the node range [a, b) of a band: nodes [i0, i1) have their whole hat inside it.

    ``_node_range`` puts the band's edges inside the first two and the last two nodes, so
    the others take the plain trapezoid weight ``tw`` (a branch-free loop that vectorises);
    returns (i0, i1, j0, j1) with the edge nodes [a, i0) and [j0, j1).
    """
    i0 = min(a + 2, b)
    i1 = max(b - 2, i0)
    return i0, i1, i1, b


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _band_sums(x, grid, tw, wt, fill, good, var, lo, hi, square_x):
    """Over one band: (sum w*y, bad width, sum (w*dy/df)^2 var); y = fill, or x^2 fill (F_nu).

    ``wt`` is ``tw`` (or ``tw * x**2`` with ``square_x``), the interior nodes' weights.
    """
    a, b = _node_range(x, grid, lo, hi)
    i0, i1, j0, j1 = _interior(a, b)
    s = 0.0
    bad = 0.0
    v = 0.0
    for i in range(i0, i1):
        w = wt[i]
        bad += tw[i] * (1.0 - good[i])
        s += w * fill[i]
        v += w * w * var[i]
    for k in range(a, i0 + j1 - j0):
        i = k if k < i0 else j0 + k - i0
        w = _weight(x, i, lo, hi)
        if not good[i]:
            bad += w
        if square_x:
            w *= x[i] * x[i]
        s += w * fill[i]
        v += w * w * var[i]
    return s, bad, v


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _grad_at(x, i, kind, p):
    """d(index)/d(pixel i) for the parameters ``p`` (a break: of one band's mean F_nu sum)."""
    if kind == BREAK:
        return _weight(x, i, p[_P_BLO], p[_P_BHI]) * x[i] * x[i]
    d = p[_P_A] * _weight(x, i, p[_P_BLO], p[_P_BHI]) + p[_P_B] * _weight(x, i, p[_P_RLO], p[_P_RHI])
    wc = _weight(x, i, p[_P_CLO], p[_P_CHI])
    if wc != 0.0:
        cont = p[_P_FR] + (p[_P_FB] - p[_P_FR]) * (p[_P_MR] - x[i]) / (p[_P_MR] - p[_P_MB])
        d -= wc / cont / p[_P_Z1]
    return d


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _move_bad(x, prev, nxt, t, bad_idx, n_bad, a, b, kind, p, moved, touched):
    """Pass the gradient of the filled bad pixels in [a, b) to their good neighbours.

    ``moved`` (zero on entry) receives the moved gradient; returns how many positions
    were written to ``touched`` (with repeats).
    """
    nt = 0
    for k in range(n_bad):
        i = bad_idx[k]
        if i < a or i >= b:
            continue
        d = _grad_at(x, i, kind, p)
        if d != 0.0:
            moved[prev[i]] += d * (1.0 - t[i])
            moved[nxt[i]] += d * t[i]
            touched[nt] = prev[i]
            touched[nt + 1] = nxt[i]
            nt += 2
    return nt


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _moved_variance(x, var, kind, p, moved, touched, nt, clear, seen):
    """Variance added by the moved gradient: sum over touched j of (2 D_j M_j + M_j^2) var_j.

    With ``clear`` the moved gradient is zeroed as it is counted (which also skips repeats);
    without, it is kept (for the composites) and ``seen`` (all False on entry and exit) skips the repeats.
    """
    dv = 0.0
    if clear:
        for k in range(nt):
            j = touched[k]
            m = moved[j]
            if m != 0.0:
                dv += (2.0 * _grad_at(x, j, kind, p) * m + m * m) * var[j]
                moved[j] = 0.0
        return dv
    for k in range(nt):
        j = touched[k]
        m = moved[j]
        if m != 0.0 and not seen[j]:
            dv += (2.0 * _grad_at(x, j, kind, p) * m + m * m) * var[j]
            seen[j] = True
    for k in range(nt):
        seen[touched[k]] = False
    return dv


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _clear_moved(moved, touched, nt):
    """Zero the moved gradient kept for the composites."""
    for k in range(nt):
        moved[touched[k]] = 0.0


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _fill_region(x, flux, ivar, mask, has_mask, s, k0, k1, fill, var, good, prev, nxt, t, bad_idx, n_bad):
    """Read pixels [k0, k1) of spectrum s; fill its bad pixels from good neighbours inside [k0, k1).

    Appends the bad pixels to ``bad_idx`` and returns their new count.
    """
    n_new = 0
    if has_mask:  # two copies of the loop: a test inside it would keep it from vectorising
        for i in range(k0, k1):
            f = np.float64(flux[s, i])
            iv = np.float64(ivar[s, i])
            ok = (iv > 0.0) & np.isfinite(f) & np.isfinite(iv) & (mask[s, i] == 0)
            good[i] = ok
            var[i] = 1.0 / iv if ok else 0.0
            fill[i] = f if ok else 0.0
            n_new += not ok
    else:
        for i in range(k0, k1):
            f = np.float64(flux[s, i])
            iv = np.float64(ivar[s, i])
            ok = (iv > 0.0) & np.isfinite(f) & np.isfinite(iv)
            good[i] = ok
            var[i] = 1.0 / iv if ok else 0.0
            fill[i] = f if ok else 0.0
            n_new += not ok
    if n_new == 0:
        return n_bad
    if n_new == k1 - k0:  # nothing good: the bands here are flagged; no neighbour search
        for i in range(k0, k1):
            bad_idx[n_bad] = i
            n_bad += 1
            prev[i], nxt[i], t[i] = k0, k0, 0.0
        return n_bad
    for i in range(k0, k1):
        if good[i]:
            continue
        bad_idx[n_bad] = i
        n_bad += 1
        p = i - 1
        while p >= k0 and not good[p]:
            p -= 1
        q = i + 1
        while q < k1 and not good[q]:
            q += 1
        # No good pixel on one side: a constant from the other; none at all: 0 (the band is flagged).
        if p < k0:
            p = q if q < k1 else k0
        if q >= k1:
            q = p
        prev[i], nxt[i] = p, q
        t[i] = (x[i] - x[p]) / (x[q] - x[p]) if x[q] > x[p] else 0.0
        fill[i] = (1.0 - t[i]) * fill[p] + t[i] * fill[q]
    return n_bad


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _measure_break(x, grid, tw, tw2, fill, good, var, z1, band, prev, nxt, t, bad_idx, n_bad, p, moved, touched, seen):
    """(value, error, bad fraction, continuum ok) of a 4000 A break: mean F_nu red / blue.

    Blue and red share no pixel, so their relative variances add.
    """
    sums = np.empty(2)
    rel = 0.0
    frac = 0.0
    for r in range(2):
        lo, hi = band[r, 0] * z1, band[r, 1] * z1
        sb, bad, vb = _band_sums(x, grid, tw, tw2, fill, good, var, lo, hi, True)
        if bad > 0.0:
            p[_P_BLO], p[_P_BHI] = lo, hi
            a, b = _node_range(x, grid, lo, hi)
            nt = _move_bad(x, prev, nxt, t, bad_idx, n_bad, a, b, BREAK, p, moved, touched)
            vb += _moved_variance(x, var, BREAK, p, moved, touched, nt, True, seen)
        sums[r] = sb
        rel += vb / (sb * sb)
        frac = max(frac, bad / (hi - lo))
    blue = sums[0] / ((band[0, 1] - band[0, 0]) * z1)
    red = sums[1] / ((band[1, 1] - band[1, 0]) * z1)
    value = red / blue
    ok = np.isfinite(value) and blue > 0.0 and red > 0.0
    return value, abs(value) * np.sqrt(rel), frac, ok


@numba.njit(cache=True, inline="always", fastmath=_FAST, error_model="numpy")
def _central_term(x, fill, good, var, i, w, mr, inv_span, fb, fr):
    """One central node's terms: (q f, d/dFb, d/dFr, bad width, q^2 var), q = w / continuum."""
    alpha = (mr - x[i]) * inv_span  # weight of the blue mean in the continuum
    inv_cont = 1.0 / (fr + (fb - fr) * alpha)
    q = w * inv_cont
    qf = q * fill[i]
    qr = qf * inv_cont
    return qf, qr * alpha, qr, w * (1.0 - good[i]), q * q * var[i]


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _measure_ew(x, grid, tw, fill, good, var, z1, band, p):
    """Equivalent width (rest A) against the straight pseudo-continuum; fills ``p`` for its gradient.

    Returns (value, variance without the bad-pixel correction, bad fraction, continuum ok).
    """
    blo, bhi = band[0, 0] * z1, band[0, 1] * z1
    rlo, rhi = band[1, 0] * z1, band[1, 1] * z1
    clo, chi = band[2, 0] * z1, band[2, 1] * z1
    sb, badb, sbb = _band_sums(x, grid, tw, tw, fill, good, var, blo, bhi, False)
    sr, badr, srr = _band_sums(x, grid, tw, tw, fill, good, var, rlo, rhi, False)
    fb = sb / (bhi - blo)
    fr = sr / (rhi - rlo)
    mb = 0.5 * (blo + bhi)
    mr = 0.5 * (rlo + rhi)
    inv_span = 1.0 / (mr - mb)
    ca, cb = _node_range(x, grid, clo, chi)
    i0, i1, j0, j1 = _interior(ca, cb)
    qf = 0.0
    dfb = 0.0
    dfr = 0.0
    badc = 0.0
    sqq = 0.0
    for i in range(i0, i1):
        t0, t1, t2, t3, t4 = _central_term(x, fill, good, var, i, tw[i], mr, inv_span, fb, fr)
        qf += t0
        dfb += t1
        dfr += t2
        badc += t3
        sqq += t4
    for k in range(ca, i0 + j1 - j0):
        i = k if k < i0 else j0 + k - i0
        t0, t1, t2, t3, t4 = _central_term(x, fill, good, var, i, _weight(x, i, clo, chi), mr, inv_span, fb, fr)
        qf += t0
        dfb += t1
        dfr += t2
        badc += t3
        sqq += t4
    dfr -= dfb
    # Cross terms where the bands overlap (a few nodes; blue and red never do in the published indices).
    ba, bb = _node_range(x, grid, blo, bhi)
    ra, rb = _node_range(x, grid, rlo, rhi)
    sbq = 0.0
    srq = 0.0
    sbr = 0.0
    for i in range(max(ca, ba), min(cb, bb)):
        q = _weight(x, i, clo, chi) / (fr + (fb - fr) * (mr - x[i]) * inv_span)
        sbq += _weight(x, i, blo, bhi) * q * var[i]
    for i in range(max(ca, ra), min(cb, rb)):
        q = _weight(x, i, clo, chi) / (fr + (fb - fr) * (mr - x[i]) * inv_span)
        srq += _weight(x, i, rlo, rhi) * q * var[i]
    for i in range(max(ba, ra), min(bb, rb)):
        sbr += _weight(x, i, blo, bhi) * _weight(x, i, rlo, rhi) * var[i]
    # D_i = A wb_i + B wr_i - q_i / z1 (wb, wr the raw band weights)
    aa = dfb / z1 / (bhi - blo)
    bb_ = dfr / z1 / (rhi - rlo)
    v = (aa * aa * sbb + bb_ * bb_ * srr + sqq / (z1 * z1) + 2.0 * aa * bb_ * sbr
         - 2.0 * aa * sbq / z1 - 2.0 * bb_ * srq / z1)
    p[_P_BLO], p[_P_BHI], p[_P_RLO], p[_P_RHI], p[_P_CLO], p[_P_CHI] = blo, bhi, rlo, rhi, clo, chi
    p[_P_A], p[_P_B], p[_P_FB], p[_P_FR], p[_P_MB], p[_P_MR], p[_P_Z1] = aa, bb_, fb, fr, mb, mr, z1
    value = ((chi - clo) - qf) / z1
    frac = max(badb / (bhi - blo), badr / (rhi - rlo), badc / (chi - clo))
    ok = fb > 0.0 and fr > 0.0 and np.isfinite(value)
    return value, v, frac, ok


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _span(x, grid, band, kind, z1):
    """Node range [a, b) covering every band of one index."""
    lo = min(band[0, 0], band[1, 0])
    hi = max(band[0, 1], band[1, 1])
    if kind == EW:
        lo = min(lo, band[2, 0])
        hi = max(hi, band[2, 1])
    return _node_range(x, grid, lo * z1, hi * z1)


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _covariance(x, var, pa, pb, moved_a, moved_b, a, b, touched_a, nta, touched_b, ntb, seen):
    """sum_j G_a,j G_b,j var_j for two EW gradients G = direct + moved.

    The direct parts overlap in nodes [a, b) only; elsewhere a product can be non-zero
    only at a node that received moved gradient.
    """
    c = 0.0
    for j in range(a, b):
        c += (_grad_at(x, j, EW, pa) + moved_a[j]) * (_grad_at(x, j, EW, pb) + moved_b[j]) * var[j]
    for k in range(nta + ntb):
        j = touched_a[k] if k < nta else touched_b[k - nta]
        if (j < a or j >= b) and not seen[j]:
            seen[j] = True
            c += (_grad_at(x, j, EW, pa) + moved_a[j]) * (_grad_at(x, j, EW, pb) + moved_b[j]) * var[j]
    for k in range(nta + ntb):
        seen[touched_a[k] if k < nta else touched_b[k - nta]] = False
    return c


@numba.njit(cache=True, error_model="numpy")
def measure_batch(x: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, zp1: np.ndarray, zok: np.ndarray,
                  bands: np.ndarray, kinds: np.ndarray, segments: np.ndarray, max_bad_frac: float, composite: np.ndarray,
                  values: np.ndarray, errors: np.ndarray, flags: np.ndarray, comp: np.ndarray) -> None:
    """Measure every index of every spectrum (see the module docstring); results written in place.

    ``composite``: positions of Mgb, Fe5270, Fe5335 in ``bands`` (or -1s to skip the composites);
    ``comp`` (n, 4): Fe_mean, Fe_mean_err, MgFe_prime, MgFe_prime_err.
    """
    n, npix = flux.shape
    nidx = bands.shape[0]
    fill = np.zeros(npix)
    var = np.zeros(npix)
    good = np.zeros(npix, dtype=np.bool_)
    prev = np.zeros(npix, dtype=np.int64)
    nxt = np.zeros(npix, dtype=np.int64)
    t = np.zeros(npix)
    bad_idx = np.zeros(npix, dtype=np.int64)
    moved = np.zeros(npix)  # scratch for one index's moved gradient, cleared as it is counted
    touched = np.zeros(2 * npix, dtype=np.int64)
    moved52 = np.zeros(npix)  # Fe5270's and Fe5335's, kept for their covariance until the spectrum is done
    touched52 = np.zeros(2 * npix, dtype=np.int64)
    moved53 = np.zeros(npix)
    touched53 = np.zeros(2 * npix, dtype=np.int64)
    seen = np.zeros(npix, dtype=np.bool_)
    p = np.zeros(_NPAR)
    p52 = np.zeros(_NPAR)
    p53 = np.zeros(_NPAR)
    has_mask = mask.shape[0] == n
    grid = _lookup(x)
    tw = np.zeros(npix)  # weight of a node whose whole hat lies inside a band
    tw[1:-1] = 0.5 * (x[2:] - x[:-2])
    tw2 = tw * x * x  # the same for F_nu (the breaks)
    im, i52, i53 = composite[0], composite[1], composite[2]
    for s in range(n):
        for k in range(nidx):
            values[s, k] = np.nan
            errors[s, k] = np.nan
        for j in range(4):
            comp[s, j] = np.nan
        z1 = zp1[s]
        n_bad = 0
        for g in range(segments.shape[0]):  # +-2 pixels for the hats and the fill
            k0 = max(_search(x, grid, segments[g, 0] * z1) - 2, 0)
            k1 = min(_search(x, grid, segments[g, 1] * z1) + 2, npix)
            n_bad = _fill_region(x, flux, ivar, mask, has_mask, s, k0, k1, fill, var, good, prev, nxt, t,
                                 bad_idx, n_bad)
        nt52 = 0
        nt53 = 0
        for k in range(nidx):
            band = bands[k]
            bit0 = 3 * k
            covered = zok[s] and band[0, 0] * z1 >= x[0] and band[1, 1] * z1 <= x[npix - 1]  # blue < red
            if not covered:
                flags[s] |= 1 << bit0
                continue
            if kinds[k] == BREAK:
                value, err, frac, cont_ok = _measure_break(x, grid, tw, tw2, fill, good, var, z1, band, prev, nxt, t, bad_idx,
                                                           n_bad, p, moved, touched, seen)
            else:
                pk = p52 if k == i52 else (p53 if k == i53 else p)
                value, v, frac, cont_ok = _measure_ew(x, grid, tw, fill, good, var, z1, band, pk)
                if n_bad:
                    a, b = _span(x, grid, band, EW, z1)
                    if k == i52:
                        nt52 = _move_bad(x, prev, nxt, t, bad_idx, n_bad, a, b, EW, pk, moved52, touched52)
                        v += _moved_variance(x, var, EW, pk, moved52, touched52, nt52, False, seen)
                    elif k == i53:
                        nt53 = _move_bad(x, prev, nxt, t, bad_idx, n_bad, a, b, EW, pk, moved53, touched53)
                        v += _moved_variance(x, var, EW, pk, moved53, touched53, nt53, False, seen)
                    else:
                        nt = _move_bad(x, prev, nxt, t, bad_idx, n_bad, a, b, EW, pk, moved, touched)
                        v += _moved_variance(x, var, EW, pk, moved, touched, nt, True, seen)
                err = np.sqrt(max(v, 0.0))
            if frac > max_bad_frac:
                flags[s] |= 1 << (bit0 + 1)
            elif not cont_ok:
                flags[s] |= 1 << (bit0 + 2)
            else:
                values[s, k] = value
                errors[s, k] = err
        if im >= 0:
            fe52, fe53, mgb = values[s, i52], values[s, i53], values[s, im]
            fe_mean = 0.5 * (fe52 + fe53)
            if np.isfinite(fe_mean):
                # Var(a Fe5270 + b Fe5335) = a^2 V52 + b^2 V53 + 2ab C; the bands overlap only in part.
                a52, b52 = _span(x, grid, bands[i52], EW, z1)
                a53, b53 = _span(x, grid, bands[i53], EW, z1)
                c = _covariance(x, var, p52, p53, moved52, moved53, max(a52, a53), min(b52, b53),
                                touched52, nt52, touched53, nt53, seen)
                v52, v53 = errors[s, i52] ** 2, errors[s, i53] ** 2
                comp[s, 0] = fe_mean
                comp[s, 1] = np.sqrt(max(0.25 * (v52 + v53 + 2.0 * c), 0.0))
                fe_w = 0.72 * fe52 + 0.28 * fe53
                var_few = 0.72 * 0.72 * v52 + 0.28 * 0.28 * v53 + 2.0 * 0.72 * 0.28 * c
                prod = mgb * fe_w
                if prod >= 0.0:
                    mgfe = np.sqrt(prod)
                    comp[s, 2] = mgfe
                    # Mgb shares no pixel with the Fe bands: independent terms.
                    e = np.sqrt(fe_w * fe_w * errors[s, im] ** 2 + mgb * mgb * max(var_few, 0.0)) / (2.0 * mgfe)
                    if np.isfinite(mgfe) and mgfe > 0.0 and np.isfinite(e):
                        comp[s, 3] = e
                    elif prod == 0.0:  # the value is 0, its error (d sqrt at 0) undefined
                        flags[s] |= 1 << MGFE_NOT_POSITIVE_BIT
                elif prod < 0.0:  # Mgb or the Fe mean in emission: no square root
                    flags[s] |= 1 << MGFE_NOT_POSITIVE_BIT
        _clear_moved(moved52, touched52, nt52)
        _clear_moved(moved53, touched53, nt53)
