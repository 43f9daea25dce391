"""The rest-frame training term that both spectrum encoders share.

Masked reconstruction on observed-frame spectra learns local features and,
on a CPU budget, little of a spectrum's global rest-frame shape, which is what
tells a post-starburst or a green pea from its neighbours in redshift. When the
training spectra come with the catalogue redshift, a small decoder
(``RestDecoder``, one hidden layer, training only) therefore predicts the
spectrum *in the rest frame* from the encoder's region-pooled tokens of the
unmasked input, and its chi^2 is added to the masked loss with weight
``REST_WEIGHT``:

* targets (``restframe_targets``): the spectrum divided by ``scale`` (the
  encoder's own normalisation), wavelengths divided by 1 + z, pixels combined
  by inverse-variance weighted mean in ln(lambda) bins of ``REST_DLNL`` over
  ``REST_RANGE``; chi^2 weights 1 / (error^2 + floor^2);
* the redshift is a *target* only: the encoders never see it, and the
  decoder is not part of the stored weights (published AstroCLIP weights and
  saved checkpoints are unchanged);
* a row with a missing or flagged redshift gets no rest-frame weight.

``emb_shen`` adopted it in its recipe 4, ``emb_astro`` in recipe 6 (its
256-token training windows: the targets outside the window's rest range weigh
0, ``window_weight``). Measured in ``bench/RESULTS.md`` ("A rest-frame term"
and "emb_astro with the rest-frame term").
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

#: Weight of the rest-frame chi^2 against the masked reconstruction loss.
REST_WEIGHT = 10.0
#: Rest-frame grid of the targets: ln(lambda) bins of ``REST_DLNL`` between ``REST_RANGE`` (A).
REST_RANGE, REST_DLNL = (1800.0, 9800.0), 0.004
REST_NBIN = int(math.log(REST_RANGE[1] / REST_RANGE[0]) / REST_DLNL)
#: Error floor (in units of the spectrum's median) of the chi^2 weights: noiseless bins do not dominate.
ERR_FLOOR = 0.02


def clean_pixels(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (flux, ivar) with bad pixels (non-finite flux or ivar, ivar <= 0) at ivar 0 and flux 0."""
    flux = np.asarray(flux, np.float64)
    ivar = np.where(np.isfinite(flux) & np.isfinite(ivar), np.asarray(ivar, np.float64), 0.0).clip(min=0)
    return np.where(ivar > 0, flux, 0.0), ivar


def usable_redshift(z: np.ndarray) -> np.ndarray:
    """Rows whose catalogue redshift can place a rest-frame target (finite, > -0.01)."""
    z = np.asarray(z, np.float64)
    return np.isfinite(z) & (z > -0.01)


def restframe_targets(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, z: np.ndarray, scale: np.ndarray,
                      err_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Rest-frame targets of the training term: (n, ``REST_NBIN``) flux / ``scale`` and its chi^2 weights.

    Pixels are combined by inverse-variance weighted mean in ln(lambda) bins
    of ``REST_DLNL`` over ``REST_RANGE`` after dividing the wavelength by
    1 + ``z``; the weight is 1 / (error^2 + ``err_floor``^2), 0 where a bin
    has no good pixel or the row's ``z`` or ``scale`` is not usable. Bad
    pixels (non-finite flux or ivar, ivar <= 0) are left out.
    """
    wave = np.asarray(wave, np.float64)
    flux, ivar = clean_pixels(flux, ivar)
    z = np.asarray(z, np.float64)
    scale = np.asarray(scale, np.float64)
    usable = usable_redshift(z) & np.isfinite(scale) & (scale > 0)
    n, nbin = len(flux), REST_NBIN
    col = np.floor((np.log(wave)[None, :] - np.log1p(np.where(usable, z, 0.0))[:, None] - math.log(REST_RANGE[0]))
                   / REST_DLNL).astype(np.int64)
    inside = (col >= 0) & (col < nbin) & (ivar > 0) & usable[:, None]
    flat = (np.arange(n)[:, None] * nbin + col)[inside]
    w = np.bincount(flat, ivar[inside], n * nbin).reshape(n, nbin)
    wf = np.bincount(flat, (ivar * flux)[inside], n * nbin).reshape(n, nbin)
    # in units of the scale: ivar of the bin mean w s^2, chi^2 weight 1 / (1 / (w s^2) + floor^2)
    s = np.where(usable, scale, 1.0)[:, None]
    ws2 = w * s**2
    target = wf / np.where(w > 0, w, 1.0) / s
    weight = ws2 / (1.0 + err_floor**2 * ws2)
    return np.clip(target, -20, 20).astype(np.float32), weight.astype(np.float32)


def window_weight(weight: torch.Tensor, lnlam_lo: float, lnlam_hi: float, ln1pz: torch.Tensor) -> torch.Tensor:
    """``weight`` (n, ``REST_NBIN``) with the bins outside an observed ln(lambda) window set to 0.

    For an encoder that sees only a window of the spectrum in a training step:
    the bins its input does not cover (at each row's ``ln(1 + z)``) cannot be
    predicted from it and must not count.
    """
    base = math.log(REST_RANGE[0])
    lo = (lnlam_lo - ln1pz - base) / REST_DLNL
    hi = (lnlam_hi - ln1pz - base) / REST_DLNL
    col = torch.arange(weight.shape[1], device=weight.device)[None, :]
    return weight * ((col >= lo[:, None]) & (col < hi[:, None])).to(weight.dtype)


class RestDecoder(nn.Sequential):
    """Region-pooled tokens (``in_dim``) -> rest-frame spectrum (training only; not stored with the encoder)."""

    def __init__(self, in_dim: int, hidden: int = 512):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, REST_NBIN))


def rest_chi2(decoder: RestDecoder, pooled: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared residual of the decoded rest-frame spectra (scale-free, as the masked losses)."""
    return (weight * (decoder(pooled) - target).square()).sum() / weight.sum().clamp(min=1e-8)
