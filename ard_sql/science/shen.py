"""``emb_shen``: a resolution-agnostic, wavelength-aware spectrum encoder.

In the spirit of Universal Spectral Tokenization (Shen et al., arXiv
2510.17959), whose code is not public; this is our own design following its
recipe:

* **native grid**: no resampling. A spectrum is read on whatever wavelength
  grid it comes on (DESI linear 0.8 A, SDSS log-lambda, ...).
* **normalisation**: flux divided by its median over good pixels; the errors
  (1/sqrt(ivar)) divided by the same number are a second channel.
* **patches in wavelength, not pixels**: the tokens are fixed intervals of
  ln(lambda) (``patch_dlnl``, about 30 A at 5000 A). Each patch is cut into
  ``n_sub`` sub-bins, and the native pixels falling in a sub-bin are combined
  by their inverse-variance weighted mean (flux) and ``1/sqrt(sum ivar)``
  (error). A patch token is therefore the same whatever the pixel size,
  which is what makes the encoder resolution-agnostic; patches with no good
  pixel are left out of the attention.
* **continuous sinusoidal wavelength encoding** of the patch centre
  ln(lambda) is added to each token (no learned position table, so any
  wavelength range works); **no redshift input**: the encoder sees the
  observed frame only.
* **pretraining**: a fraction of the present patches is replaced by a learned
  mask token and the model reconstructs their sub-bin fluxes, each sub-bin
  weighted by its inverse variance (a chi^2 loss, capped so that noiseless
  bins do not dominate).
* **rest-frame term** (recipe 4; ``science.restframe``): when the training
  spectra come with the catalogue redshift, a small decoder predicts the
  spectrum in the rest frame from the region-pooled tokens of the unmasked,
  cropped spectrum, and its chi^2 (same normalisation and error floor as the
  masked loss) is added with weight ``REST_WEIGHT``. The redshift is a
  *target* during training only: the encoder still sees the observed frame
  and no redshift, and the decoder is not part of the stored weights
  (measured in ``bench/RESULTS.md``, "A rest-frame term").

The embedding: the final-LayerNorm outputs of the present patch tokens
averaged over ``pool_regions`` equal observed-wavelength ranges of the
patch span the training spectra cover (6 x 128 = 768 for the CPU
configuration, 1 for the full-width one), concatenated, then centred and
PCA-whitened (regularised, ``specformer.WHITEN_EPS`` = 0.01 of the largest eigenvalue) with statistics
of the training spectra stored with the weights (buffers ``centre``,
``whiten``, ``pool_span``), zero-padded to ``EMB_SHEN_DIM`` (768) when narrower.
The regions are fixed wavelength intervals and the means are over whatever
patches are present, so the vector stays grid-independent.

**Grid-noise damping** (recipe 5): at that small eps the whitening also
amplifies directions in which a faint spectrum's pooled tokens move when its
pixels are binned differently (the noise falls into the sub-bins in another
way). The head spectra are therefore also read on a log10-lambda grid
(``GRID_NOISE_DLOGLAM`` = 1.5e-4, deliberately not the 1e-4 of SDSS that the
resampling check uses), and the covariance of the change in their pooled
tokens, times ``GRID_NOISE_WEIGHT``, is added to the covariance before
whitening (``specformer.fit_whitening(noise=...)``). On two mocks it lifted
the worst resampling cosine from 0.933 to 0.958 (bench/RESULTS.md,
"Grid-noise damping").

**Grid consistency and S/N directions** (recipe 8): the embedding also said
how well a galaxy was observed (its neighbours predicted its log S/N with
Spearman 0.99), and projecting the S/N directions out of the head
(:data:`SNR_DIRECTIONS`) found the post-starbursts as well as rest-frame PCA
does, but left a faint spectrum's vector mostly grid noise. So training also
reads a few spectra of each batch on another log-lambda grid
(``CONSISTENCY_DLOGLAMS``) and penalises the change in their region-pooled
tokens (``CONSISTENCY_WEIGHT``): the encoder itself becomes grid-steady, and
the head can then remove the S/N directions and still pass the resampling
check (bench/RESULTS.md, "Grid consistency").

**Noise consistency** (recipe 13): a faint spectrum's tokens are mostly noise,
and mean-pooled they made faint galaxies each other's neighbours whatever they
were (a green pea at SNR_Median 0.29 found 3 green peas among its 10 at 477
steps, 8 at 2000). So
training also reads a few spectra of each batch with noise added down to a
median S/N of 0.3-3 and pulls their region-pooled tokens towards the clean
reading's (``NOISE_WEIGHT``; bench/RESULTS.md, "Noise consistency").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from ard_sql import paths
from ard_sql.science.restframe import (ERR_FLOOR, REST_DLNL, REST_RANGE, REST_WEIGHT, RestDecoder, clean_pixels, rest_chi2,
                                       restframe_targets)


@dataclass(frozen=True)
class ShenConfig:
    """Hyper-parameters of the encoder."""

    lam_min: float = 3400.0
    """Blue edge of the token grid (observed frame, Angstrom)."""
    lam_max: float = 11000.0
    patch_dlnl: float = 0.006
    """Width of a patch in ln(lambda) (0.006 = 1800 km/s, about 30 A at 5000 A)."""
    n_sub: int = 8
    """Sub-bins per patch (3.8 A at 5000 A: wider than DESI and SDSS pixels)."""
    embed_dim: int = 768
    num_layers: int = 6
    num_heads: int = 8
    dropout: float = 0.0
    mask_fraction: float = 0.3
    err_floor: float = ERR_FLOOR
    """Error floor (in median-flux units) in the reconstruction weights: caps 1/err^2."""
    pool_regions: int = 6
    """Wavelength regions pooled separately into the embedding (``pool_regions x embed_dim`` numbers)."""

    @property
    def n_patches(self) -> int:
        """Number of wavelength patches (tokens) covering ``lam_min``-``lam_max`` at ``patch_dlnl`` each."""
        return int(math.ceil(math.log(self.lam_max / self.lam_min) / self.patch_dlnl))


#: Full size, as the paper's ViT scale (a GPU job); 768 wide, so plain mean pooling fills the column.
FULL_CONFIG = ShenConfig(pool_regions=1)
#: CPU default used by the build on the demo (6 regions x 128 = 768).
SMALL_CONFIG = ShenConfig(embed_dim=128, num_layers=2, num_heads=4)

_LOG_ERR_MIN, _LOG_ERR_MAX = -4.0, 2.0

#: Grid-noise damping of the embedding head (recipe 5): the head spectra are also read on a
#: log10-lambda grid of ``GRID_NOISE_DLOGLAM`` and the covariance of the change in their pooled
#: tokens, times ``GRID_NOISE_WEIGHT``, is added to the covariance that is whitened.
GRID_NOISE_DLOGLAM, GRID_NOISE_WEIGHT = 1.5e-4, 1000.0

#: Grid-consistency term (recipe 8): each step also reads ``CONSISTENCY_BATCH`` of the batch's spectra on
#: one of these log10-lambda grids (drawn per step; neither is the 1e-4 of the resampling check nor the
#: head's ``GRID_NOISE_DLOGLAM``) and adds ``CONSISTENCY_WEIGHT`` x the mean squared difference between their
#: region-pooled tokens and the native grid's, same crop.
CONSISTENCY_DLOGLAMS, CONSISTENCY_BATCH, CONSISTENCY_WEIGHT = (0.7e-4, 1.4e-4), 8, 100.0

#: Noise-consistency term (recipe 13; bench/RESULTS.md, "Noise consistency"): each step also reads
#: ``NOISE_BATCH`` of the batch's spectra with Gaussian noise added up to an error of 1 / S in median-flux units
#: per sub-bin, S drawn log-uniformly in ``NOISE_SNR_RANGE``, and adds ``NOISE_WEIGHT`` x the mean squared
#: difference between their region-pooled tokens and the clean ones' (held fixed: the noisy reading is pulled to
#: the clean one, never the reverse), so that a faint spectrum embeds near bright ones of its kind rather than
#: near other faint ones. Weights 3-100 traded the post-starbursts' Balmer detail for it; 1 did not.
NOISE_SNR_RANGE, NOISE_BATCH, NOISE_WEIGHT = (0.3, 3.0), 8, 1.0

SNR_DIRECTIONS = 3
"""Directions of the whitened embedding that a cubic in log S/N predicts, projected out by the head (recipe 8).

A galaxy's 10 nearest neighbours in emb_shen predicted its own log S/N with Spearman 0.99: the vector said how
well the galaxy was observed as loudly as what it is. Removing those directions cost the resampling check
until the encoder was trained grid-steady (``CONSISTENCY_WEIGHT``); see bench/RESULTS.md, "Grid consistency"."""


def bin_spectra(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, config: ShenConfig
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalise and tokenise spectra given on a common native grid ``wave`` (L,).

    Returns ``f`` (n, P, K) sub-bin flux / median, ``e`` (n, P, K) sub-bin
    error / median (inf where a sub-bin has no good pixel), ``present`` (n, P)
    bool and ``scale`` (n,) the median used (NaN where a spectrum is unusable:
    no good pixel or a non-positive median of |flux|).
    """
    wave = np.asarray(wave, np.float64)
    flux, ivar = clean_pixels(flux, ivar)
    P, K = config.n_patches, config.n_sub
    pos = (np.log(wave / config.lam_min) / config.patch_dlnl) * K  # fractional sub-bin index
    col = np.floor(pos).astype(np.int64)
    inside = (col >= 0) & (col < P * K)
    A = sp.csr_matrix((np.ones(inside.sum()), (np.flatnonzero(inside), col[inside])), shape=(len(wave), P * K))
    w = np.asarray(A.T @ ivar.T).T  # (n, PK) sum of ivar
    wf = np.asarray(A.T @ (ivar * flux).T).T
    with np.errstate(divide="ignore", invalid="ignore"):
        fb = np.where(w > 0, wf / w, np.nan)
        # the median over sub-bins (fixed ln-lambda cells), not over pixels: a
        # log-lambda grid has more pixels in the blue and would shift a pixel median
        med = np.nanmedian(fb, axis=1) if (w > 0).any() else np.full(len(w), np.nan)
        amed = np.nanmedian(np.abs(fb), axis=1) if (w > 0).any() else med
        # a faint spectrum can have a median <= 0; its median |flux| keeps the scale meaningful
        scale = np.where(med > 0, med, amed)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.nan)
        f = np.where(w > 0, fb, 0.0) / scale[:, None]
        e = np.where(w > 0, 1.0 / np.sqrt(w), np.inf) / scale[:, None]
    f = np.nan_to_num(f, nan=0.0).reshape(-1, P, K).astype(np.float32)
    e = np.nan_to_num(e, nan=np.inf, posinf=np.inf).reshape(-1, P, K).astype(np.float32)
    # a patch is a token only when every sub-bin has data: a patch cut by the
    # end of the coverage would otherwise differ from grid to grid
    present = (w.reshape(-1, P, K) > 0).all(axis=2) & np.isfinite(scale)[:, None]
    return f, e, present, scale


def wavelength_encoding(lnlam: torch.Tensor, dim: int) -> torch.Tensor:
    """Continuous sinusoidal encoding of ln(lambda): periods from 1e-4 to ~2.3 in ln(lambda)."""
    half = dim // 2
    periods = torch.logspace(math.log10(2.3), -4, half, dtype=torch.float32)
    ang = 2 * math.pi * lnlam[..., None] / periods
    enc = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    return F.pad(enc, (0, dim - 2 * half))


class ShenEncoder(nn.Module):
    """Transformer over wavelength patches (see the module docstring)."""

    def __init__(self, config: ShenConfig = SMALL_CONFIG):
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Linear(2 * c.n_sub, c.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(c.embed_dim))
        layer = nn.TransformerEncoderLayer(c.embed_dim, c.num_heads, 4 * c.embed_dim, c.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.final_layernorm = nn.LayerNorm(c.embed_dim)
        self.head = nn.Linear(c.embed_dim, c.n_sub)
        centres = math.log(c.lam_min) + (np.arange(c.n_patches) + 0.5) * c.patch_dlnl
        self.register_buffer("wave_enc", wavelength_encoding(torch.tensor(centres - math.log(c.lam_min), dtype=torch.float32), c.embed_dim))
        # the embedding head, fitted on the training spectra by ``train`` (see the module docstring)
        d = c.pool_regions * c.embed_dim
        self.register_buffer("pool_span", torch.tensor([0, c.n_patches], dtype=torch.long))
        self.register_buffer("centre", torch.zeros(d))
        self.register_buffer("whiten", torch.eye(d))

    def embedding(self, f: torch.Tensor, e: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Region-pooled, centred, whitened embedding (n, pool_regions * embed_dim)."""
        return (self.region_pooled(f, e, present) - self.centre) @ self.whiten

    def region_pooled(self, f: torch.Tensor, e: torch.Tensor, present: torch.Tensor,
                      span: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens of an unmasked pass averaged over the ``pool_regions`` regions of ``span`` (default: the
        stored ``pool_span``): the embedding before centring and whitening, (n, pool_regions * embed_dim)."""
        from ard_sql.science.specformer import region_pool

        span = span if span is not None else tuple(int(v) for v in self.pool_span)
        return region_pool(self(f, e, present)["tokens"], self.config.pool_regions, present, span)

    def tokens(self, f: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """(n, P, K) flux and error sub-bins -> (n, P, 2K) token inputs (error as clipped log10)."""
        loge = torch.log10(e.clamp(min=1e-12)).clamp(_LOG_ERR_MIN, _LOG_ERR_MAX)
        return torch.cat([f.clamp(-20, 20), loge], dim=-1)

    def forward(self, f: torch.Tensor, e: torch.Tensor, present: torch.Tensor,
                masked: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode; ``masked`` (n, P) bool replaces those tokens by the mask token. Returns tokens, reconstructions, pooled."""
        x = self.token_embed(self.tokens(f, e))
        if masked is not None:
            x = torch.where(masked[..., None], self.mask_token.expand_as(x), x)
        x = x + self.wave_enc
        # rows with no present patch would make attention NaN; they are NULL anyway
        keep = present | ~present.any(1, keepdim=True)
        x = self.final_layernorm(self.encoder(x, src_key_padding_mask=~keep))
        w = present.to(x.dtype)[..., None]
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1)
        return {"tokens": x, "reconstructions": self.head(x), "pooled": pooled}


def _to_torch(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@torch.no_grad()
def embed(model: ShenEncoder, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray,
          out_dim: int | None = None, batch_size: int = 64) -> np.ndarray:
    """Return (n, out_dim) float32 ``emb_shen`` vectors; NaN rows for spectra that cannot be normalised."""
    from ard_sql.science.specformer import model_device

    model.eval()
    d = model.config.pool_regions * model.config.embed_dim
    out_dim = out_dim or d
    if out_dim < d:
        raise ValueError(f"encoder width {d} exceeds the emb_shen column width {out_dim}")
    out = np.zeros((len(flux), out_dim), np.float32)
    device = model_device(model)
    for i in range(0, len(flux), batch_size):
        f, e, present, scale = bin_spectra(wave, flux[i:i + batch_size], ivar[i:i + batch_size], model.config)
        ft, et, pt = (t.to(device) for t in _to_torch(f, e, present))
        emb = model.embedding(ft, et, pt).cpu().numpy()
        emb[~present.any(1)] = np.nan
        out[i:i + batch_size, :d] = emb
        out[i:i + batch_size][~present.any(1)] = np.nan
    return out


def _crop_like(cropped: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The patches of ``other`` (n, P) within the first..last patch kept in ``cropped``: the same crop on another grid."""
    P = cropped.shape[1]
    idx = torch.arange(P, device=cropped.device)[None, :]
    first = torch.where(cropped, idx, P).min(1, keepdim=True).values
    last = torch.where(cropped, idx, -1).max(1, keepdim=True).values
    out = other & (idx >= first) & (idx <= last)
    return torch.where(out.any(1, keepdim=True), out, other)


def _random_crop(present: torch.Tensor, gen: torch.Generator, max_patches: int = 8) -> torch.Tensor:
    """Drop up to ``max_patches`` present patches at each end: teaches the encoder that coverage varies."""
    n, P = present.shape
    rank = present.cumsum(1)
    count = rank[:, -1:]
    # drawn on the generator's (CPU) side: the same crops on any device
    lo = torch.randint(0, max_patches + 1, (n, 1), generator=gen).to(present.device)
    hi = torch.randint(0, max_patches + 1, (n, 1), generator=gen).to(present.device)
    keep = (rank > lo) & (rank <= count - hi)
    out = present & keep
    # never crop a spectrum to nothing
    return torch.where(out.any(1, keepdim=True), out, present)


def _loss(model: ShenEncoder, f: torch.Tensor, e: torch.Tensor, present: torch.Tensor,
          gen: torch.Generator) -> torch.Tensor:
    present = _random_crop(present, gen)
    masked = (torch.rand(present.shape, generator=gen) < model.config.mask_fraction).to(present.device) & present
    recon = model(f, e, present, masked)["reconstructions"]
    # inverse-variance weights with a floor; empty sub-bins (e = inf) weigh 0
    w = 1.0 / (e.square() + model.config.err_floor ** 2)
    w = torch.where(torch.isfinite(e), w, torch.zeros_like(w)) * masked[..., None]
    # weighted mean of squared residuals: scale-free, so the learning rate does not depend on S/N
    return (w * (recon - f).square()).sum() / w.sum().clamp(min=1e-8)


def train(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, config: ShenConfig = SMALL_CONFIG, *,
          z: np.ndarray | None = None, rest_weight: float = REST_WEIGHT,
          consistency_weight: float = CONSISTENCY_WEIGHT, noise_weight: float = NOISE_WEIGHT, epochs: int = 3,
          steps: int | None = None, batch_size: int = 32,
          lr: float = 1e-3, seed: int = 0,
          max_seconds: float | None = None, warmup: int = 20, head_max: int = 1000,
          device: str | torch.device | None = "auto", callback: Callable[[int, float], None] | None = None,
          model: ShenEncoder | None = None) -> tuple[ShenEncoder, dict[str, Any]]:
    """Masked, noise-weighted reconstruction pretraining on spectra on one native grid.

    With ``z`` (catalogue redshifts, NaN where unknown) and ``rest_weight`` > 0
    the rest-frame term of the module docstring is added; the encoder never
    sees ``z``. With ``consistency_weight`` > 0 the grid-consistency term of
    the module docstring is added; with ``noise_weight`` > 0 the noise-consistency term
    (``NOISE_WEIGHT``). The learning rate warms up linearly over ``warmup`` steps.
    Afterwards the embedding head (pooled span, centre, whitening) is fitted
    on up to ``head_max`` of the training spectra. Deterministic for a seed
    and thread count; ``steps``, when given, is the number of optimizer steps
    and replaces ``epochs`` (``specformer.pretrain``); ``max_seconds`` bounds the optimisation. Training and the
    head run on ``device`` (``specformer.resolve_device``); the model is
    returned on the CPU. ``callback`` goes to ``specformer.pretrain``; a
    ``model`` given is trained in place (its ``config`` wins over ``config``;
    the rest-frame decoder's initial weights then come from a different state
    of torch's global generator than without one).
    """
    from ard_sql.science.specformer import WHITEN_EPS, pretrain, resolve_device

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = resolve_device(device)
    config = model.config if model is not None else config
    f, e, present, scale, ok = _tokenise(wave, flux, ivar, config)
    span = token_span(present)
    f, e, present = f.to(dev), e.to(dev), present.to(dev)
    model = (model or ShenEncoder(config)).to(dev)
    rest = z is not None and rest_weight > 0
    # the same training spectra on other grids, for the consistency term
    others = [[t.to(dev) for t in _to_torch(*bin_spectra(*resample_loglam(wave, flux[ok], ivar[ok], dl), config)[:3])]
              for dl in CONSISTENCY_DLOGLAMS] if consistency_weight > 0 else []
    if rest:
        target, weight = _to_torch(*restframe_targets(wave, flux[ok], ivar[ok], np.asarray(z)[ok], scale, config.err_floor))
        rest = bool(weight.sum() > 0)
        target, weight = target.to(dev), weight.to(dev)
    decoder = RestDecoder(config.pool_regions * config.embed_dim).to(dev) if rest else None
    # one optimiser for the encoder and (while training only) the decoder
    trained = nn.ModuleDict({"encoder": model, "decoder": decoder}) if rest else model

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        loss = _loss(model, f[idx], e[idx], present[idx], gen)
        if decoder is None and not others and noise_weight <= 0:
            return loss
        cropped = _random_crop(present[idx], gen)
        pooled = model.region_pooled(f[idx], e[idx], cropped, span)
        if decoder is not None:
            loss = loss + rest_weight * rest_chi2(decoder, pooled, target[idx], weight[idx])
        if others:
            g = int(torch.randint(0, len(others), (1,), generator=gen))
            sub = idx[:CONSISTENCY_BATCH]
            fo, eo, po = (t[sub] for t in others[g])
            crop = _crop_like(cropped[:len(sub)], po)
            loss = loss + consistency_weight * (model.region_pooled(fo, eo, crop, span) - pooled[:len(sub)]).square().mean()
        if noise_weight > 0:
            sub = idx[:NOISE_BATCH]
            fs, es = f[sub], e[sub]
            lo, hi = (math.log(v) for v in NOISE_SNR_RANGE)
            goal = torch.exp(torch.empty(len(sub), 1, 1).uniform_(lo, hi, generator=gen)).to(fs.device)
            # the noise that takes each sub-bin's error to 1 / goal (median-flux units); none where it is larger
            add = torch.where(torch.isfinite(es), (goal.reciprocal().square() - es.square()).clamp(min=0).sqrt(),
                              torch.zeros_like(es))
            noisy_f = fs + torch.randn(fs.shape, generator=gen).to(fs.device) * add
            noisy = model.region_pooled(noisy_f, torch.sqrt(es.square() + add.square()), cropped[:len(sub)], span)
            loss = loss + noise_weight * (noisy - pooled[:len(sub)].detach()).square().mean()
        return loss

    t0 = time.perf_counter()
    losses, taken, stopped = pretrain(trained, len(f), batch_loss, gen, epochs=epochs, steps=steps, batch_size=batch_size,
                                      lr=lr, warmup=warmup, max_seconds=max_seconds, callback=callback)
    seconds = time.perf_counter() - t0
    removed = fit_head(model, wave, flux, ivar, seed=seed, head_max=head_max, span=span)
    model.to("cpu")
    return model, {"epoch_loss": losses, "steps": taken, "seconds": seconds, "head_seconds": time.perf_counter() - t0 - seconds,
                   "stopped_by_time": stopped, "n_train": int(len(f)), "config": asdict(config),
                   "device": str(dev), "recipe": {"lr": lr, "batch_size": batch_size, "warmup": warmup,
                              **({"epochs": epochs} if steps is None else {"step_budget": steps}),
                              "whiten_eps": WHITEN_EPS, "rest_weight": rest_weight if rest else 0.0,
                              "rest_range": REST_RANGE, "rest_dlnl": REST_DLNL,
                              "consistency_weight": consistency_weight, "consistency_batch": CONSISTENCY_BATCH,
                              **({"noise_weight": noise_weight, "noise_snr_range": list(NOISE_SNR_RANGE)} if noise_weight > 0 else {}),
                              "consistency_dloglams": list(CONSISTENCY_DLOGLAMS), "snr_directions": removed,
                              "grid_noise_weight": GRID_NOISE_WEIGHT, "grid_noise_dloglam": GRID_NOISE_DLOGLAM}}


@torch.no_grad()
def fit_head(model: ShenEncoder, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, *, seed: int = 0,
             head_max: int = 1000, eps: float | None = None, grid_noise_weight: float = GRID_NOISE_WEIGHT,
             snr_directions: int = SNR_DIRECTIONS, span: tuple[int, int] | None = None) -> int:
    """Fit the embedding head (pooled span, centre, whitening) on up to ``head_max`` of the spectra; returns the
    number of S/N directions projected out (``snr_directions``, or 0 where too few spectra were there to fit them).

    ``eps`` is the whitening regularisation (default ``specformer.WHITEN_EPS``).
    With ``grid_noise_weight`` > 0 the same spectra are also rebinned onto a
    log-lambda grid (``GRID_NOISE_DLOGLAM``) and the directions in which their
    pooled tokens move are damped (``GRID_NOISE_WEIGHT``): at the whitening's
    small eps, those directions otherwise carry a noise that differs from grid
    to grid (bench/RESULTS.md, "Grid-noise damping"). The ``snr_directions``
    directions that log S/N predicts are then projected out of the whitening
    (:data:`SNR_DIRECTIONS`). ``span`` is the pooled
    patch span of all the spectra (``token_span``) when the caller has it already.
    """
    from ard_sql.science.specformer import WHITEN_EPS, fit_whitening, median_snr, model_device

    model.eval()
    if span is None:
        span = token_span(tokenise_for_training(wave, flux, ivar, model.config)[2])
    model.pool_span.copy_(torch.tensor(span))
    sub = np.sort(np.random.default_rng(seed).permutation(len(flux))[:head_max])

    device = model_device(model)

    def pooled(w: np.ndarray, fl: np.ndarray, iv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, e, present, _ = bin_spectra(w, fl, iv, model.config)
        f, e, present = (t.to(device) for t in _to_torch(f, e, present))
        out = torch.cat([model.region_pooled(f[j], e[j], present[j], span) for j in torch.split(torch.arange(len(f)), 256)])
        return out.cpu().numpy().astype(np.float64), present.cpu().numpy().any(1)

    x, ok = pooled(wave, flux[sub], ivar[sub])
    noise = None
    if grid_noise_weight > 0:
        x2, ok2 = pooled(*resample_loglam(wave, flux[sub], ivar[sub], GRID_NOISE_DLOGLAM))
        d = (x - x2)[ok & ok2]
        noise = grid_noise_weight * np.cov(d.T, bias=True) / 2  # half: each reading carries its own part
    centre, whiten, removed = fit_whitening(x[ok], WHITEN_EPS if eps is None else eps, noise,
                                            snr=median_snr(flux[sub][ok], ivar[sub][ok]), snr_directions=snr_directions)
    model.centre.copy_(torch.from_numpy(centre))
    model.whiten.copy_(torch.from_numpy(whiten))
    return removed


def token_span(present: torch.Tensor) -> tuple[int, int]:
    """(first, last + 1) patch present in any of the (n, P) ``present`` rows: the span the pooling regions divide."""
    cols = np.flatnonzero(present.cpu().numpy().any(0))
    return int(cols.min()), int(cols.max()) + 1


def tokenise_for_training(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, config: ShenConfig
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bin_spectra`` as tensors, spectra without a present patch dropped (raises when none is left)."""
    return _tokenise(wave, flux, ivar, config)[:3]


def _tokenise(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, config: ShenConfig):
    """``tokenise_for_training`` plus the kept rows' scale and the kept-row mask."""
    f, e, present, scale = bin_spectra(wave, flux, ivar, config)
    ok = present.any(1)
    if not ok.any():
        raise ValueError("emb_shen training: no spectrum with good pixels")
    f, e, present = _to_torch(f[ok], e[ok], present[ok])
    return f, e, present, scale[ok], ok


def resample_loglam(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, dloglam: float = 1e-4,
                    lo: float | None = None, hi: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flux-conserving rebinning onto an SDSS-like log10-lambda grid (default: the input's range).

    For the resolution-agnosticism check (tests, bench): returns (wave, flux, ivar) on the new grid.
    """
    lo = lo or wave[0] * 1.0002
    hi = hi or wave[-1] / 1.0002
    new = 10 ** np.arange(np.log10(lo), np.log10(hi), dloglam)
    edges = np.concatenate([[new[0] * 10 ** (-dloglam / 2)], new * 10 ** (dloglam / 2)])
    dw = np.gradient(wave)
    cum = np.concatenate([np.zeros((len(flux), 1)), np.cumsum(flux * dw, axis=1)], axis=1)
    old_edges = np.concatenate([[wave[0] - dw[0] / 2], wave + dw / 2])
    integ = np.array([np.interp(edges, old_edges, c) for c in cum])
    nflux = np.diff(integ, axis=1) / np.diff(edges)
    # variance of a mean over (new width / old width) pixels
    ratio = np.diff(edges) / np.interp(new, wave, dw)
    nivar = np.array([np.interp(new, wave, iv) for iv in ivar]) * ratio
    return new, nflux.astype(np.float32), nivar.astype(np.float32)


def save_checkpoint(model: ShenEncoder, path: Path | str, extra: dict[str, Any] | None = None) -> None:
    """Save ``{"state_dict", "hyper_parameters"}`` (+ ``extra``) atomically."""
    with paths.atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": asdict(model.config), **(extra or {})}, tmp)


def load_checkpoint(path: Path | str) -> ShenEncoder:
    """Load an encoder saved by ``save_checkpoint`` (tensors only are unpickled)."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
        model = ShenEncoder(ShenConfig(**ckpt["hyper_parameters"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:
        raise ValueError(f"{path}: not an emb_shen checkpoint ({exc})") from exc
    model.eval()
    return model
