"""SpecFormer: the AstroCLIP spectrum encoder (Parker et al. 2024), for ``emb_astro``.

Architecture (as AstroCLIP's ``astroclip/models/specformer.py``; written here
from its description, parameter names kept so published weights load):

* per-spectrum standardisation: ``x -> (x - mean) / max(std, 0.2)``;
* the standardised spectrum is cut into patches of 20 pixels with stride 10
  (overlap 10); each patch is a token of ``20 + 2`` numbers;
* a leading token carries the spectrum's mean and std as
  ``((mean - 2) / 2, (std - 2) / 8)`` in its first two slots, so the amplitude
  the standardisation removed is still seen by the encoder;
* a linear token embedding plus a learned position embedding, pre-LayerNorm
  transformer blocks, a final LayerNorm and a linear reconstruction head;
* pretraining: zero ``mask_num_chunks`` contiguous runs of ``mask_chunk_width``
  tokens and regress the original tokens there (MSE on the masked tokens).
  When the build trains it (no published weights), the rest-frame term of
  ``science.restframe`` is added on each training window (recipe 6): the
  catalogue redshift is a training target, never an input, and the decoder
  it trains is not stored, so the weights stay AstroCLIP's architecture.
  It is our addition, not AstroCLIP's recipe: on two mock surveys it raised
  every rare-population and sSFR/Dn4000 figure of ``emb_astro``
  (``bench/RESULTS.md``, "emb_astro with the rest-frame term").

State-dict names (``data_embed``, ``position_embed``, ``blocks.i.layernorm1``,
``blocks.i.attention.attention``, ``blocks.i.attention.projection``,
``blocks.i.layernorm2``, ``blocks.i.mlp.encoder``, ``blocks.i.mlp.decoder``,
``final_layernorm``, ``head``) and the Lightning checkpoint layout
(``{"state_dict", "hyper_parameters"}``) match AstroCLIP, so
``load_checkpoint`` reads a published ``specformer.ckpt`` or the full
AstroCLIP checkpoint (prefix ``spectrum_encoder.backbone.``).

The ``emb_astro`` vector of a spectrum (the "embedding head", kept outside
the state dict so the weights stay AstroCLIP's):

* **rest-frame region pooling** (recipe 10, ``REST_BINS``): each patch token is
  placed at its rest wavelength with the catalogue Z (the encoder itself never
  sees it), and per equal ln-lambda region of the head's rest range
  (``rest_head_windows``: from the grid's first wavelength at the sample's 5th
  redshift percentile to its last at the median) the mean and the maximum of
  the final-LayerNorm token outputs are kept: ``REST_BINS x 2 x embed_dim``
  numbers. The same line then lands in the same region at every redshift, as
  in rest-frame PCA; the maximum keeps a strong narrow line that a mean over
  the region would dilute;
* **line windows** (recipe 11, ``LINE_WINDOWS``): the same mean and maximum
  over the tokens within +-0.2 % of each of twelve lines ([O II], [Ne III],
  H-delta, H-gamma, H-beta, [O III] 4959/5007, [O I], H-alpha, [N II],
  [S II] 6716/6731), so a line's tokens weigh on their own, not diluted in
  a region's continuum. A region or window a
  spectrum does not reach takes the sample's mean (it adds nothing); a
  spectrum that reaches none of them, or has no usable Z, gets a NULL vector;
* **the leading principal directions**: the centred numbers are projected on
  their ``out_dim`` (768) leading principal directions in the head's sample;
* **PCA whitening** of those directions, fitted on the same sample:
  ``(v - centre) @ whiten`` with ``whiten = V diag(1/sqrt(lambda + eps
  lambda_max))`` (eps ``ASTRO_WHITEN_EPS`` = 0.1: the leading directions no longer dominate
  the cosine distance, the noise directions are not blown up). Without it, every vector
  of a briefly trained model points the same way (cosine distances ~1e-4);
* **the S/N direction projected out** (recipe 7, ``SNR_DIRECTIONS``): the
  direction of the whitened vectors that the spectra's log median S/N
  predicts is removed (folded into ``whiten``), so neighbours are found by
  spectral type more than by how well they were observed;
* zero-padded to ``EMB_ASTRO_DIM`` when narrower (zero padding changes no
  cosine distance).

``save_checkpoint`` stores the head beside ``state_dict`` (key ``emb_head``);
a published AstroCLIP checkpoint has none, and the build fits one on the
ARD's spectra (``fit_embedding_head``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ard_sql import paths
from ard_sql.science.kinematics import LINES, NUISANCE_LINES
from ard_sql.science.restframe import (ERR_FLOOR, REST_DLNL, REST_RANGE, REST_WEIGHT, RestDecoder, rest_chi2, restframe_targets,
                                       usable_redshift, window_weight)


@dataclass(frozen=True)
class SpecFormerConfig:
    """Hyper-parameters; names as AstroCLIP's ``SpecFormer.__init__`` (its ``hyper_parameters``)."""

    input_dim: int = 22
    """Numbers per token: ``slice_section_length + 2``."""
    embed_dim: int = 768
    num_layers: int = 6
    num_heads: int = 6
    max_len: int = 800
    """Longest token sequence (779 tokens for a 7781-pixel DESI spectrum)."""
    mask_num_chunks: int = 6
    mask_chunk_width: int = 50
    slice_section_length: int = 20
    slice_overlap: int = 10
    dropout: float = 0.1
    norm_first: bool = False
    """Kept for checkpoint compatibility (AstroCLIP's blocks are pre-norm regardless)."""


#: The published AstroCLIP spectrum encoder (~43M parameters).
ASTROCLIP_CONFIG = SpecFormerConfig()
#: The configuration trained on the ARD's own spectra on a CPU: same patching,
#: standardisation and masking, narrower and shallower (~0.3M parameters).
SMALL_CONFIG = SpecFormerConfig(embed_dim=128, num_layers=2, num_heads=4, dropout=0.0)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        self.heads, self.p = heads, dropout
        self.attention = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attention(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.residual_dropout(self.projection(y.transpose(1, 2).reshape(b, t, c)))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.encoder = nn.Linear(dim, hidden)
        self.decoder = nn.Linear(hidden, dim)
        self.dropout_layer = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout_layer(self.decoder(F.gelu(self.encoder(x))))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.layernorm1 = nn.LayerNorm(dim)
        self.attention = _SelfAttention(dim, heads, dropout)
        self.layernorm2 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, 4 * dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm1(x))
        return x + self.mlp(self.layernorm2(x))


class SpecFormer(nn.Module):
    """The AstroCLIP spectrum transformer (see the module docstring)."""

    def __init__(self, config: SpecFormerConfig = SMALL_CONFIG):
        super().__init__()
        self.config = config
        c = config
        self.data_embed = nn.Linear(c.input_dim, c.embed_dim)
        self.position_embed = nn.Embedding(c.max_len, c.embed_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([_Block(c.embed_dim, c.num_heads, c.dropout) for _ in range(c.num_layers)])
        self.final_layernorm = nn.LayerNorm(c.embed_dim)
        self.head = nn.Linear(c.embed_dim, c.input_dim)
        self._init_weights()
        # the embedding head (not in the state dict: see the module docstring)
        self.emb_lnwindows: torch.Tensor | None = None
        self.emb_centre: torch.Tensor | None = None
        self.emb_whiten: torch.Tensor | None = None
        self.emb_info: dict[str, Any] = {}

    def _init_weights(self) -> None:
        # depth-scaled truncated normals, as AstroCLIP's initialisation
        std = 1 / math.sqrt(self.config.embed_dim)
        for emb in (self.data_embed, self.position_embed):
            nn.init.trunc_normal_(emb.weight, std=std, a=-3 * std, b=3 * std)
        for depth, mods in ((self.config.num_layers, self.blocks), (0.5, self.head)):
            for m in mods.modules():
                if isinstance(m, nn.Linear):
                    s = 1 / math.sqrt(2 * m.weight.shape[-1] * depth)
                    nn.init.trunc_normal_(m.weight, std=s, a=-3 * s, b=3 * s)
                    nn.init.zeros_(m.bias)

    def preprocess(self, flux: torch.Tensor) -> torch.Tensor:
        """(B, L) flux -> (B, 1 + n_patches, input_dim) tokens with the mean/std token first."""
        c = self.config
        std = flux.std(1, keepdim=True).clamp(min=0.2)
        mean = flux.mean(1, keepdim=True)
        x = (flux - mean) / std
        step = c.slice_section_length - c.slice_overlap
        patches = x.unfold(1, c.slice_section_length, step)  # full patches only, as AstroCLIP
        tokens = F.pad(patches, (2, 0, 1, 0))
        tokens[:, 0, 0] = (mean[:, 0] - 2) / 2
        tokens[:, 0, 1] = (std[:, 0] - 2) / 8
        return tokens

    def forward_tokens(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encode preprocessed tokens; returns ``reconstructions`` and per-token ``embedding``.

        ``positions`` (T,) are the tokens' indices in the full sequence (default
        ``0..T-1``); training on crops of the spectrum passes the crop's own.
        """
        t = tokens.shape[1]
        if positions is None:
            if t > self.config.max_len:
                raise ValueError(f"{t} tokens exceed max_len {self.config.max_len}")
            positions = torch.arange(t, device=tokens.device)
        x = self.dropout(self.data_embed(tokens) + self.position_embed(positions))
        for block in self.blocks:
            x = block(x)
        x = self.final_layernorm(x)
        return {"reconstructions": self.head(x), "embedding": x}

    def forward(self, flux: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocess a (B, L) flux batch and encode it."""
        return self.forward_tokens(self.preprocess(flux))

    def mask_tokens(self, tokens: torch.Tensor, generator: torch.Generator, num_chunks: int | None = None) -> torch.Tensor:
        """Zero ``mask_num_chunks`` (or ``num_chunks``) runs of ``mask_chunk_width`` tokens, one run per equal section."""
        c = self.config
        nc = num_chunks or c.mask_num_chunks
        b, t, _ = tokens.shape
        section = t // nc
        if section <= c.mask_chunk_width:
            raise ValueError(f"{t} tokens are too few to mask {nc} chunks of {c.mask_chunk_width}")
        starts = torch.randint(0, section - c.mask_chunk_width, (b, nc), generator=generator)
        starts = starts + torch.arange(nc) * section
        pos = torch.arange(t)
        masked = ((pos[None, None, :] >= starts[..., None]) & (pos[None, None, :] < starts[..., None] + c.mask_chunk_width)).any(1)
        # drawn on the generator's (CPU) side: the same masks on any device
        return tokens.masked_fill(masked.to(tokens.device)[..., None], 0.0)


WHITEN_EPS = 0.01
"""Regularisation of the PCA whitening, as a fraction of the largest eigenvalue.

0.01 rather than 0.1 (recipe 3): weaker regularisation lets the directions
below the leading few count in the cosine distance; on two mock surveys it
raised every kNN regression of emb_shen and its rare-population precision
(bench/RESULTS.md, "Whitening regularisation")."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): the first CUDA GPU when torch sees one, else the CPU; otherwise ``torch.device(device)``.

    Only training and the embedding heads use it; the random draws (masks,
    crops, batch order) always come from a CPU generator, so a seed gives the
    same sequence of batches on any device.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters are on."""
    return next(model.parameters()).device


def region_pool(tokens: torch.Tensor, regions: int, weights: torch.Tensor | None = None,
                span: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, T, D) token outputs -> (B, regions * D): weighted means over ``regions`` equal runs of ``span``."""
    b, t, d = tokens.shape
    lo, hi = span or (0, t)
    w = torch.ones(b, t, dtype=tokens.dtype, device=tokens.device) if weights is None else weights.to(tokens.dtype)
    out = []
    for idx in np.array_split(np.arange(lo, hi), regions):
        ww = w[:, idx, None]
        out.append((tokens[:, idx] * ww).sum(1) / ww.sum(1).clamp(min=1))
    return torch.cat(out, dim=1)


def fit_whitening(pooled: np.ndarray, eps: float = WHITEN_EPS, noise: np.ndarray | None = None,
                  snr: np.ndarray | None = None, snr_directions: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Centre (D,), regularised PCA-whitening matrix (D, D) of pooled training embeddings, and the number of
    S/N directions projected out of it (0 where :func:`snr_projection` had too few rows to fit them).

    ``noise`` (D, D), when given, is added to the covariance before whitening, so
    that directions where it is large are scaled down (emb_shen passes the
    covariance of what changes when the same spectra are read on another grid).
    With ``snr`` (one median S/N per row), the ``snr_directions`` directions of the
    whitened rows that log S/N predicts are projected out of the matrix
    (:func:`snr_projection`): the embedding should not say how well a galaxy was observed.
    """
    rows = np.asarray(pooled)
    finite = np.isfinite(rows).all(axis=1)
    x = rows[finite].astype(np.float64)
    centre = x.mean(0)
    cov = np.cov((x - centre).T, bias=True).reshape(x.shape[1], x.shape[1])
    lam, vec = np.linalg.eigh(cov if noise is None else cov + noise)
    lam = lam.clip(min=0)
    centre, whiten = centre.astype(np.float32), (vec / np.sqrt(lam + eps * max(lam.max(), 1e-30))).astype(np.float32)
    project = None if snr is None else snr_projection((rows[finite] - centre) @ whiten, np.asarray(snr)[finite], snr_directions)
    if project is not None:
        whiten = (whiten @ project).astype(np.float32)
    return centre, whiten, (snr_directions if project is not None else 0)


SNR_DIRECTIONS = 1
"""Directions of emb_astro's whitened embedding that a polynomial of this degree in log S/N predicts,
projected out by its head (recipe 7; 0 turns it off).

An embedding should describe the galaxy, not how well it was observed, yet a galaxy's 10 nearest
neighbours in emb_astro predicted its own log S/N with Spearman 0.98. Projecting out the one direction
that log S/N predicts linearly (fitted on the head's spectra) raised post-starburst precision@10
0.657 -> 0.694 and 0.768 -> 0.793 on two mocks and green peas 0.919 -> 0.925, 0.861 -> 0.872, the four
kNN regressions moving by -0.006..+0.005 (bench/RESULTS.md, "S/N directions"). Builds apply it from recipe 9 on
(``train`` fits the head with the spectra's ivar); on the recipe 9 weights it trades green peas (-0.02 / -0.03) for
post-starbursts (+0.02 / +0.02) and is kept for its purpose (bench/RESULTS.md, "Noise-aware training"). emb_shen projects out
three (``shen.SNR_DIRECTIONS``), which it can afford once its encoder is trained grid-steady (recipe 8)."""


def median_snr(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Per-spectrum median of |flux| sqrt(ivar) over the good pixels (ivar > 0, finite flux); NaN with none."""
    flux = np.asarray(flux, np.float64)
    ivar = np.asarray(ivar, np.float64)
    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    snr = np.where(good, np.abs(np.where(good, flux, 0.0)) * np.sqrt(np.where(good, ivar, 0.0)), np.nan)
    out = np.full(len(flux), np.nan)
    has = good.any(axis=1)
    out[has] = np.nanmedian(snr[has], axis=1)
    return out


def snr_projection(whitened: np.ndarray, snr: np.ndarray, degree: int = SNR_DIRECTIONS) -> np.ndarray | None:
    """(D, D) projector removing the directions of ``whitened`` rows that a polynomial in log10 ``snr`` predicts.

    Least squares of the centred rows on (s, ..., s^degree), s the standardised
    log10 S/N; the ``degree`` coefficient vectors span the removed subspace.
    None (nothing to remove) for degree 0 or fewer usable rows than 10 x (degree + 1).
    """
    x = np.asarray(whitened, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.log10(np.clip(np.asarray(snr, np.float64), 0.05, None))
    ok = np.isfinite(x).all(axis=1) & np.isfinite(s)
    if degree <= 0 or ok.sum() < 10 * (degree + 1) or np.std(s[ok]) == 0:
        return None
    x, s = x[ok] - x[ok].mean(0), (s[ok] - s[ok].mean()) / s[ok].std()
    basis = np.column_stack([s**k for k in range(1, degree + 1)])
    basis -= basis.mean(0)
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    q, _ = np.linalg.qr(coef.T)
    return np.eye(x.shape[1]) - q @ q.T


def fill_bad_pixels(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Replace pixels with ``ivar <= 0`` or non-finite flux by linear interpolation of good neighbours.

    SpecFormer has no error channel; a masked pixel set to 0 would look like
    an absorption line. Spectra with no good pixel become all-NaN (the caller
    turns them into NULL embeddings).
    """
    return _fill(np.asarray(flux, dtype=np.float32), good_pixels(flux, ivar))


def _fill(flux: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``fill_bad_pixels`` with the good-pixel mask given."""
    out = flux.copy()
    x = np.arange(flux.shape[1])
    for i in np.flatnonzero(~good.all(axis=1)):
        g = good[i]
        out[i] = np.interp(x, x[g], flux[i, g]) if g.any() else np.nan
    return out


REST_BINS = 24
"""Rest-frame regions of emb_astro's head (recipe 10): equal ln-lambda bins between :func:`rest_head_windows`'s limits.

Each region contributes the mean and the maximum of the final-LayerNorm patch tokens whose (catalogue-Z) rest
wavelength falls in it. Pooling where a feature sits *in the galaxy's frame* lines up the same absorption
or emission line across redshifts, as rest-frame PCA does; pooling over observed wavelength ranges (recipes 2-9)
put it in a different region at each redshift. On the recipe 9 weights of two mocks, 24 regions with mean and
max raised post-starburst precision@10 0.695 -> 0.825 and 0.754 -> 0.832 and green peas 0.888 -> 0.988 and
0.806 -> 0.911, the kNN regressions moving by -0.02..+0.01 (bench/RESULTS.md, "Rest-frame head for emb_astro").
The encoder never sees the redshift; only the head uses it to place the tokens."""

ASTRO_WHITEN_EPS = 0.1
"""The whitening regularisation of emb_astro's rest-frame head (``WHITEN_EPS`` = 0.01 is emb_shen's).

Its 768 principal directions come from many more numbers (24 regions x mean and max) than recipe 9's
6 regions, and the trailing ones are mostly sampling noise of 1000 spectra. On the recipe 10 weights of two
mocks, eps 0.1 against 0.01 moved sSFR R^2 0.784 -> 0.787 / 0.774 -> 0.796, Dn4000 0.881 -> 0.885 /
0.874 -> 0.894, green-pea precision@10 0.962 -> 0.988 / 0.844 -> 0.900 and post-starbursts 0.818 -> 0.818 /
0.849 -> 0.879 (bench/RESULTS.md, "Rest-frame head for emb_astro")."""

REST_QUANTILES = (0.05, 0.5)
"""Redshift quantiles of the head's sample that set its rest range: from the grid's first wavelength at the
5th percentile to its last at the median, so every region is reached by at least half the sample."""

LINE_WINDOWS: dict[str, float] = {
    "[OII]3727": (LINES["OII_3726"][0] + LINES["OII_3729"][0]) / 2, "[NeIII]3869": NUISANCE_LINES["NeIII_3869"],
    "Hdelta": LINES["Hdelta"][0], "Hgamma": LINES["Hgamma"][0], "Hbeta": LINES["Hbeta"][0],
    "[OIII]4959": LINES["OIII_4959"][0], "[OIII]5007": LINES["OIII_5007"][0], "[OI]6300": NUISANCE_LINES["OI_6300"],
    "Halpha": LINES["Halpha"][0], "[NII]6584": LINES["NII_6584"][0], "[SII]6716": LINES["SII_6716"][0],
    "[SII]6731": LINES["SII_6731"][0]}
"""Rest-frame line windows of emb_astro's head (recipe 11), vacuum centres from ``kinematics``.

Each adds the mean and the maximum of the tokens within +-:data:`LINE_HALF_WIDTH` of the line to the 24
regions: a region (~3.3 % in ln-lambda on the mocks' range 3255-7218 A, 20-40 tokens) dilutes a line's few
tokens in its continuum, a window keeps them apart from it, so the emission lines and the Balmer absorption weigh
on their own. Windows of close lines overlap and share tokens (H-alpha and [N II] 6584; the [S II] pair, whose
6716 window reaches to within 1 A of 6731: at ~16 A per token its maximum mostly sees the stronger line). On the recipe 9 weights
of two mocks (bench/RESULTS.md, "Line windows for emb_astro"), these 12 windows at +-0.2 % raised sSFR R^2
0.799 -> 0.815 / 0.798 -> 0.831, Dn4000 0.891 -> 0.895 / 0.900 -> 0.909 and green-pea precision@10
0.981 -> 1.000 / 0.900 -> 1.000, post-starbursts 0.852 -> 0.861 / 0.874 -> 0.895, for Z -0.013 / -0.012 and
LogMass -0.005 / -0.005; seven lines ([OII], Balmer, [OIII]) or wider windows (+-0.3 to 1 %) did less."""

LINE_HALF_WIDTH = 2e-3
"""Half width of a line window as a fraction of its wavelength (+-600 km/s): 2-5 tokens on the DESI grid
(tokens 8 A apart; 2 for [O II] at z ~ 0, 5 for H-alpha at z ~ 0.45)."""


def token_lnlam(wave: np.ndarray, config: SpecFormerConfig) -> np.ndarray:
    """ln(wavelength) at the centre of each patch token of a spectrum on the grid ``wave`` (full patches only)."""
    lnl = np.log(np.asarray(wave, np.float64))
    step = config.slice_section_length - config.slice_overlap
    patches = np.lib.stride_tricks.sliding_window_view(lnl, config.slice_section_length)[::step]
    return patches.mean(axis=1)


TOKEN_MIN_GOOD = 0.5
"""A patch token counts in the head's windows when at least this fraction of its pixels is good.

``fill_bad_pixels`` bridges a masked pixel or two well, but across a long masked stretch (a dead amplifier, a
masked arm end: ``np.interp`` holds the last good value flat) the tokens describe made-up flux; a window holding
only such tokens is treated as not reached (it takes the sample's mean), not pooled from them."""


def token_good_fraction(good: np.ndarray, config: SpecFormerConfig) -> np.ndarray:
    """(n, tokens) fraction of good pixels (``good`` (n, L) bool) in each patch token, tokens as :func:`token_lnlam`."""
    step = config.slice_section_length - config.slice_overlap
    g = np.asarray(good, np.float32)
    return np.lib.stride_tricks.sliding_window_view(g, config.slice_section_length, axis=1)[:, ::step].mean(axis=-1)


def good_pixels(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """(n, L) bool: pixels with ``ivar > 0`` and finite flux (those ``fill_bad_pixels`` keeps)."""
    return (np.asarray(ivar) > 0) & np.isfinite(np.asarray(flux))


def filled_and_good(flux: np.ndarray, ivar: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(flux with bad pixels filled, :func:`good_pixels`) for the head; ``(flux, None)`` without ``ivar``."""
    flux = np.asarray(flux, np.float32)
    if ivar is None:
        return flux, None
    good = good_pixels(flux, ivar)
    return _fill(flux, good), good


def rest_head_windows(wave: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(REST_BINS + len(LINE_WINDOWS), 2) ln(lambda) intervals [lo, hi) of the head's rest-frame windows:
    :data:`REST_BINS` equal regions over the range the sample's redshifts allow (:data:`REST_QUANTILES`), then
    +-:data:`LINE_HALF_WIDTH` around each line of :data:`LINE_WINDOWS` (what ``fit_embedding_head`` records)."""
    zz = np.asarray(z, np.float64)[usable_redshift(z)]
    if len(zz) < 10:
        raise ValueError(f"emb_astro head: {len(zz)} spectra with a usable catalogue Z; it needs at least 10 "
                         "to choose its rest-frame range")
    z_lo, z_hi = (float(q) for q in np.quantile(zz, REST_QUANTILES))
    lo, hi = math.log(float(wave[0])) - math.log1p(z_lo), math.log(float(wave[-1])) - math.log1p(z_hi)
    if hi <= lo:
        raise ValueError(f"emb_astro head: the sample's redshift quantiles {REST_QUANTILES} ({z_lo:.3f}, {z_hi:.3f}) leave "
                         f"no rest-frame range that the grid {wave[0]:.0f}-{wave[-1]:.0f} A covers")
    edges = np.linspace(lo, hi, REST_BINS + 1)
    centres = np.log(list(LINE_WINDOWS.values()))
    line_windows = np.stack([centres + math.log1p(-LINE_HALF_WIDTH), centres + math.log1p(LINE_HALF_WIDTH)], 1)
    return np.concatenate([np.stack([edges[:-1], edges[1:]], 1), line_windows])


@torch.no_grad()
def rest_pooled(model: SpecFormer, wave: np.ndarray, flux: np.ndarray, z: np.ndarray, lnwindows: np.ndarray,
                batch_size: int = 64, good: np.ndarray | None = None) -> np.ndarray:
    """(n, windows * 2 * embed_dim): per rest-frame window (ln-lambda [lo, hi), :func:`rest_head_windows`) the mean
    and the max of the final-LayerNorm patch tokens whose rest wavelength falls in it.

    ``flux`` must be finite (``fill_bad_pixels``) on an ascending grid ``wave``. With ``good`` ((n, L) bool, the
    pixels before filling: :func:`good_pixels`), tokens with fewer than :data:`TOKEN_MIN_GOOD` good pixels are left
    out. A window no (kept) token of a spectrum reaches is NaN; a row with an unusable ``z`` is all NaN.
    """
    device = model_device(model)
    lnl_np = token_lnlam(wave, model.config)
    if not (np.diff(lnl_np) > 0).all():
        raise ValueError("emb_astro head: the wavelength grid must ascend")
    lnl = torch.from_numpy(lnl_np.astype(np.float32)).to(device)
    win = torch.from_numpy(np.asarray(lnwindows, np.float32)).to(device)
    d = model.config.embed_dim
    zok = usable_redshift(z)
    ln1pz = torch.from_numpy(np.log1p(np.where(zok, z, 0.0)).astype(np.float32))
    out = np.full((len(flux), len(win) * 2 * d), np.nan, np.float32)
    for i in range(0, len(flux), batch_size):
        emb = model(torch.from_numpy(np.ascontiguousarray(flux[i:i + batch_size])).to(device))["embedding"][:, 1:]
        b, t, _ = emb.shape
        keep = (torch.ones((b, t), dtype=torch.bool) if good is None else
                torch.from_numpy(token_good_fraction(good[i:i + batch_size], model.config)[:, :t] >= TOKEN_MIN_GOOD)).to(device)
        rest = (lnl[None, :t] - ln1pz[i:i + batch_size, None].to(device)).contiguous()
        # the tokens ascend in wavelength, so a window holds the run [first, stop) of each row: rest >= lo, rest < hi
        first = torch.searchsorted(rest, win[:, 0].expand(b, -1).contiguous())
        stop = torch.searchsorted(rest, win[:, 1].expand(b, -1).contiguous())
        run = stop - first  # (b, windows)
        # means from running sums of the kept tokens (float64: differences of sums over hundreds of tokens stay exact)
        cum = F.pad((emb.double() * keep[..., None]).cumsum(1), (0, 0, 1, 0))
        kcum = F.pad(keep.long().cumsum(1), (1, 0))
        count = kcum.gather(1, stop) - kcum.gather(1, first)  # kept tokens per window
        sums = cum.gather(1, stop[..., None].expand(-1, -1, d)) - cum.gather(1, first[..., None].expand(-1, -1, d))
        mean = (sums / count.clamp(min=1)[..., None]).float()
        # maxima over each window's run only, not a masked copy of every token per window
        peak = torch.full_like(mean, float("-inf"))
        for k in range(len(win)):
            span = int(run[:, k].max())
            if span:
                offset = torch.arange(span, device=device)
                pos = (first[:, k, None] + offset).clamp(max=t - 1)
                vals = emb.gather(1, pos[..., None].expand(-1, -1, d))
                drop = (offset >= run[:, k, None]) | ~keep.gather(1, pos)
                peak[:, k] = vals.masked_fill(drop[..., None], float("-inf")).amax(1)
        pooled = torch.stack([mean, peak], 2).masked_fill((count == 0)[..., None, None], float("nan"))
        out[i:i + b] = pooled.reshape(b, -1).cpu().numpy()
    out[~zok] = np.nan
    return out


def _head_regions(out_dim: int, config: SpecFormerConfig) -> int:
    """Observed-wavelength regions the training's rest-frame term pools into: the most whose tokens fit ``out_dim``."""
    return max(1, out_dim // config.embed_dim)


def fit_embedding_head(model: SpecFormer, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray | None, z: np.ndarray, *,
                       out_dim: int = 768, n_max: int = 1000, seed: int = 0, batch_size: int = 64,
                       eps: float = ASTRO_WHITEN_EPS, snr_directions: int = SNR_DIRECTIONS) -> dict[str, Any]:
    """Fit emb_astro's head on up to ``n_max`` spectra (grid ``wave``, catalogue redshifts ``z``): rest-frame
    regions and line windows (:func:`rest_head_windows`), the centre, the ``out_dim`` leading principal directions
    and their whitening (regularisation ``eps``); with ``ivar`` the ``snr_directions`` directions that log S/N
    predicts are projected out (:data:`SNR_DIRECTIONS`). The head is set on ``model`` (with what it was fitted
    with, for :func:`head_summary`) and returned as :func:`embedding_head`'s dict.
    """
    model.eval()
    flux = np.asarray(flux, np.float32)
    z = np.asarray(z, np.float64)
    snr = np.full(len(flux), np.nan) if ivar is None else median_snr(flux, ivar)
    flux, good = filled_and_good(flux, ivar)
    keep = np.flatnonzero(np.isfinite(flux).all(axis=1) & usable_redshift(z))
    if len(keep) > n_max:
        keep = keep[np.sort(np.random.default_rng(seed).choice(len(keep), n_max, replace=False))]
    lnwindows = rest_head_windows(wave, z[keep])
    pooled = rest_pooled(model, wave, flux[keep], z[keep], lnwindows, batch_size, None if good is None else good[keep])
    reached = ~np.isnan(pooled).all(axis=1)
    pooled, snr = pooled[reached], snr[keep][reached]
    if len(pooled) < 10:
        raise ValueError(f"emb_astro head: {len(pooled)} spectra reach its rest-frame range; it needs at least 10")
    with np.errstate(all="ignore"):
        mean = np.nan_to_num(np.nanmean(pooled, axis=0))
    # a window a spectrum does not reach takes the sample's mean: it adds nothing to the centred vector
    x = np.where(np.isnan(pooled), mean, pooled).astype(np.float64) - mean
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    k = int(min(out_dim, (sv > sv[0] * 1e-6).sum()))
    project = vt[:k].T
    c2, whiten, removed = fit_whitening(x @ project, eps, snr=snr, snr_directions=snr_directions)
    model.emb_lnwindows = torch.from_numpy(lnwindows)
    model.emb_centre = torch.from_numpy((mean + c2 @ project.T).astype(np.float32))
    model.emb_whiten = torch.from_numpy((project @ whiten).astype(np.float32))
    model.emb_info = {"regions": REST_BINS, "lines": list(LINE_WINDOWS), "line_half_width": LINE_HALF_WIDTH,
                      "whiten_eps": float(eps), "snr_directions": int(removed)}
    return embedding_head(model)


def head_summary(model: SpecFormer) -> dict[str, Any]:
    """What the training log and ``ard_meta`` say about a fitted head: regions, rest range (A), line windows,
    width, and the eps and S/N directions it was fitted with."""
    info = model.emb_info
    regions = model.emb_lnwindows[:info["regions"]]
    return {"head_regions": info["regions"], "head_range": [round(math.exp(float(v)), 1) for v in (regions[0, 0], regions[-1, 1])],
            "head_lines": info["lines"], "head_line_half_width": info["line_half_width"],
            "head_width": int(model.emb_whiten.shape[1]), "whiten_eps": info["whiten_eps"],
            "snr_directions": info["snr_directions"]}


def embedding_head(model: SpecFormer) -> dict[str, Any]:
    """The head as a checkpoint-storable dict (tensors and plain values); empty before :func:`fit_embedding_head`."""
    if getattr(model, "emb_whiten", None) is None:
        return {}
    return {"rest_lnwindows": model.emb_lnwindows, "centre": model.emb_centre, "whiten": model.emb_whiten,
            "info": dict(model.emb_info)}


@torch.no_grad()
def embed(model: SpecFormer, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray | None, z: np.ndarray,
          out_dim: int | None = None, batch_size: int = 64) -> np.ndarray:
    """(n, out_dim) float32 ``emb_astro`` vectors (zero-padded). NaN rows (NULL in the column) for a spectrum
    with no good pixel, an unusable ``z`` (:func:`restframe.usable_redshift`) or no token in the head's rest-frame windows
    (with ``ivar``, tokens of mostly masked pixels do not count: :data:`TOKEN_MIN_GOOD`)."""
    if getattr(model, "emb_whiten", None) is None:
        raise ValueError("this SpecFormer has no embedding head: fit one with specformer.fit_embedding_head "
                         "(it needs the spectra's grid and catalogue redshifts)")
    model.eval()
    flux, good = filled_and_good(flux, ivar)
    centre, whiten = model.emb_centre.numpy(), model.emb_whiten.numpy()
    out_dim = out_dim or whiten.shape[1]
    if out_dim < whiten.shape[1]:
        raise ValueError(f"SpecFormer embedding width {whiten.shape[1]} exceeds the emb_astro column width {out_dim}")
    out = np.full((len(flux), out_dim), np.nan, np.float32)
    ok = np.flatnonzero(np.isfinite(flux).all(axis=1) & usable_redshift(z))
    pooled = rest_pooled(model, wave, flux[ok], np.asarray(z, np.float64)[ok], model.emb_lnwindows.numpy(), batch_size,
                         None if good is None else good[ok])
    reached = ~np.isnan(pooled).all(axis=1)
    pooled = np.where(np.isnan(pooled), centre, pooled)[reached]
    out[ok[reached]] = 0.0
    out[ok[reached], :whiten.shape[1]] = (pooled - centre) @ whiten
    return out


def pretrain(model: nn.Module, n: int, batch_loss: Callable[[torch.Tensor], torch.Tensor], gen: torch.Generator, *,
             epochs: int, batch_size: int, lr: float, warmup: int, max_seconds: float | None,
             steps: int | None = None, callback: Callable[[int, float], None] | None = None
             ) -> tuple[list[float], int, bool]:
    """The self-supervised loop both encoders share: AdamW with a linear warm-up over shuffled batches.

    ``batch_loss(indices)`` returns the loss of one batch of training rows.
    Stops after ``steps`` optimizer steps when given (over as many passes as
    that takes; ``epochs`` is then ignored), else after ``epochs`` passes, and
    in either case once ``max_seconds`` have passed; returns (mean loss per
    pass, steps taken, whether the time limit stopped it). A step budget makes
    the weights the same on a slow and a fast machine; a time limit does not.
    ``callback(steps, seconds)``, when given, is called after every step
    (progress display, snapshots of the weights).
    """
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup)))
    losses: list[float] = []
    taken, stopped = 0, False
    passes = epochs if steps is None else math.ceil(steps / math.ceil(n / batch_size))
    model.train()
    for _ in range(passes):
        perm = torch.randperm(n, generator=gen)
        epoch_loss = []
        for i in range(0, n, batch_size):
            loss = batch_loss(perm[i:i + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss.append(loss.item())
            taken += 1
            if callback is not None:
                callback(taken, time.perf_counter() - t0)
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                stopped = True
                break
            if steps is not None and taken >= steps:
                break
        losses.append(float(np.mean(epoch_loss)))
        if stopped:
            break
    return losses, taken, stopped


def train(flux: np.ndarray, ivar: np.ndarray | None = None, config: SpecFormerConfig = SMALL_CONFIG, *,
          wave: np.ndarray | None = None, z: np.ndarray | None = None, rest_weight: float = REST_WEIGHT,
          epochs: int = 3, steps: int | None = None, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
          max_seconds: float | None = None, model: SpecFormer | None = None, crop: int | None = 256,
          warmup: int = 20, out_dim: int = 768, device: str | torch.device | None = "auto", fit_head: bool = True,
          callback: Callable[[int, float], None] | None = None) -> tuple[SpecFormer, dict[str, Any]]:
    """Masked-chunk pretraining on (n, L) spectra; returns the model and a log (losses, seconds, steps).

    Each step sees the mean/std token plus a random window of ``crop`` patch
    tokens at their true positions (``None``: the whole spectrum), masked with
    AstroCLIP's chunks scaled to the window: the attention cost falls with the
    square of the length, so a CPU budget buys several times more steps. The
    learning rate warms up linearly over ``warmup`` steps. With ``wave`` (the
    spectra's wavelengths, L), ``z`` (catalogue redshifts, NaN where unknown)
    and ``rest_weight`` > 0, the rest-frame term of ``science.restframe`` is
    added: the window's unmasked tokens, pooled into the embedding's regions,
    predict the window's rest-frame spectrum (a second forward pass; the
    encoder never sees ``z``). Afterwards, unless ``fit_head`` is False, the
    embedding head (:func:`fit_embedding_head`; it needs ``wave`` and ``z``) is fitted for ``out_dim``. Deterministic for a given seed and
    thread count. ``steps``, when given, is the number of optimizer steps and
    replaces ``epochs`` (``pretrain``); ``max_seconds`` stops training early
    (recorded in the log). Training and the head run on ``device``
    (``resolve_device``); the model is returned on the CPU. ``callback`` goes
    to ``pretrain``. A ``model`` given is trained in place; with the
    rest-frame term its decoder's initial weights then come from a different
    state of torch's global generator than without one.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    raw = np.asarray(flux, np.float32)
    flux = fill_bad_pixels(raw, ivar) if ivar is not None else raw
    keep = np.isfinite(flux).all(axis=1)
    flux = flux[keep]
    if len(flux) == 0:
        raise ValueError("SpecFormer training: no spectrum with good pixels")
    dev = resolve_device(device)
    model = (model or SpecFormer(config)).to(dev)
    c = model.config
    data = torch.from_numpy(flux).to(dev)
    regions = _head_regions(out_dim, c)
    rest = None
    if wave is not None and z is not None and rest_weight > 0:
        iv = np.asarray(ivar, np.float64)[keep] if ivar is not None else np.isfinite(raw[keep]).astype(np.float64)
        zk = np.asarray(z, np.float64)[keep]
        target, weight = restframe_targets(wave, raw[keep], iv, zk, _median_scale(raw[keep], iv), ERR_FLOOR)
        if weight.sum() > 0:
            ln1pz = np.log1p(np.where(usable_redshift(zk), zk, 0.0))
            rest = {"target": torch.from_numpy(target).to(dev), "weight": torch.from_numpy(weight).to(dev),
                    "ln1pz": torch.from_numpy(ln1pz.astype(np.float32)).to(dev),
                    "lnlam": np.log(np.asarray(wave, np.float64)),
                    "decoder": RestDecoder(regions * c.embed_dim).to(dev)}
    # one optimiser for the encoder and (while training only) the decoder
    trained = nn.ModuleDict({"encoder": model, "decoder": rest["decoder"]}) if rest else model

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        target = model.preprocess(data[idx])
        n_tok = target.shape[1] - 1
        start, length = 1, n_tok
        positions = None
        if crop and crop < n_tok:
            start, length = 1 + int(torch.randint(0, n_tok - crop + 1, (1,), generator=gen)), crop
            positions = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(start, start + crop)]).to(dev)
            target = target[:, positions]
        # AstroCLIP's masked fraction, in chunks of its width, on whatever length this step sees
        chunks = max(1, min(c.mask_num_chunks, round(c.mask_num_chunks * (target.shape[1] - 1) / max(1, n_tok))))
        while chunks > 1 and target.shape[1] // chunks <= c.mask_chunk_width:
            chunks -= 1
        masked = model.mask_tokens(target, gen, num_chunks=chunks)
        recon = model.forward_tokens(masked, positions)["reconstructions"]
        locs = (masked != target).to(recon.dtype)
        loss = F.mse_loss(recon * locs, target * locs) / locs.mean().clamp(min=1e-8)
        if rest:
            loss = loss + rest_weight * _window_rest_loss(model, rest, idx, target, positions, start, length, n_tok, regions)
        return loss

    t0 = time.perf_counter()
    losses, taken, stopped = pretrain(trained, len(data), batch_loss, gen, epochs=epochs, steps=steps,
                                      batch_size=batch_size, lr=lr, warmup=warmup, max_seconds=max_seconds,
                                      callback=callback)
    seconds = time.perf_counter() - t0
    model.eval()
    t1 = time.perf_counter()
    head = {}
    if fit_head:
        if wave is None or z is None:
            raise ValueError("SpecFormer training: the embedding head needs the spectra's grid (wave) and catalogue "
                             "redshifts (z); pass them, or fit_head=False")
        # the raw flux and its ivar: the head measures each spectrum's S/N to project it out (SNR_DIRECTIONS)
        fit_embedding_head(model, wave, raw[keep], None if ivar is None else np.asarray(ivar)[keep],
                           np.asarray(z, np.float64)[keep], out_dim=out_dim, seed=seed)
        head = head_summary(model)
    model.to("cpu")
    return model, {"epoch_loss": losses, "steps": taken, "seconds": seconds, "head_seconds": time.perf_counter() - t1,
                   "stopped_by_time": stopped, "n_train": int(len(data)), "config": asdict(model.config),
                   "device": str(dev), "recipe": {"lr": lr, "batch_size": batch_size, "crop": crop, "warmup": warmup,
                              **({"epochs": epochs} if steps is None else {"step_budget": steps}),
                              "train_regions": regions, **head,
                              "rest_weight": rest_weight if rest else 0.0, "rest_range": REST_RANGE, "rest_dlnl": REST_DLNL}}


def _median_scale(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Median flux over good pixels (median |flux| where that is <= 0): the rest-frame targets' unit."""
    good = np.where((ivar > 0) & np.isfinite(flux), flux, np.nan)
    with np.errstate(all="ignore"):
        med = np.nanmedian(good, axis=1)
        return np.where(med > 0, med, np.nanmedian(np.abs(good), axis=1))


def _window_rest_loss(model: SpecFormer, rest: dict[str, Any], idx: torch.Tensor, tokens: torch.Tensor,
                      positions: torch.Tensor | None, start: int, length: int, n_tok: int, regions: int) -> torch.Tensor:
    """The rest-frame chi^2 of one step: the unmasked window's tokens, pooled into the embedding's
    regions of the whole spectrum (a region the window misses is 0), decode the window's rest range."""
    emb = model.forward_tokens(tokens, positions)["embedding"][:, 1:]
    full = emb.new_zeros(emb.shape[0], n_tok, emb.shape[2])
    full[:, start - 1:start - 1 + length] = emb
    w = torch.zeros(emb.shape[0], n_tok, device=emb.device)
    w[:, start - 1:start - 1 + length] = 1.0
    pooled = region_pool(full, regions, w)
    # the pixels the window's patches cover: token j >= 1 starts at pixel (j - 1) * step
    step = model.config.slice_section_length - model.config.slice_overlap
    p0, p1 = (start - 1) * step, (start - 2 + length) * step + model.config.slice_section_length
    weight = window_weight(rest["weight"][idx], float(rest["lnlam"][p0]), float(rest["lnlam"][p1 - 1]), rest["ln1pz"][idx])
    return rest_chi2(rest["decoder"], pooled, rest["target"][idx], weight)


def save_checkpoint(model: SpecFormer, path: Path | str, extra: dict[str, Any] | None = None) -> None:
    """Save in AstroCLIP's Lightning layout: ``{"state_dict", "hyper_parameters"}`` (+ ``extra``)."""
    with paths.atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": asdict(model.config),
                    "emb_head": embedding_head(model), **(extra or {})}, tmp)


def load_checkpoint(path: Path | str) -> SpecFormer:
    """Load a SpecFormer from a local checkpoint: ours, AstroCLIP's ``specformer.ckpt`` or a full AstroCLIP checkpoint.

    Only tensors and plain containers are unpickled (``weights_only=True``).
    The configuration comes from ``hyper_parameters`` where present, else it
    is read off the tensor shapes (heads default to AstroCLIP's 6).
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with foreign classes, a truncated file, ...
        raise ValueError(f"{path}: cannot read as a SpecFormer/AstroCLIP checkpoint ({exc})") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no state_dict in checkpoint")
    keys = [k for k in state if k.endswith("data_embed.weight")]
    if not keys:
        raise ValueError(f"{path}: no SpecFormer weights (no key ending in 'data_embed.weight')")
    # the full AstroCLIP model nests the encoder under 'spectrum_encoder.backbone.'
    prefix = min(keys, key=len)[: -len("data_embed.weight")]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    hp = dict(ckpt.get("hyper_parameters") or {}) if not prefix else {}
    names = {f.name for f in fields(SpecFormerConfig)}
    hp = {k: v for k, v in hp.items() if k in names}
    hp.setdefault("input_dim", int(state["data_embed.weight"].shape[1]))
    hp.setdefault("embed_dim", int(state["data_embed.weight"].shape[0]))
    hp.setdefault("max_len", int(state["position_embed.weight"].shape[0]))
    hp.setdefault("num_layers", len({k.split(".")[1] for k in state if k.startswith("blocks.")}))
    model = SpecFormer(SpecFormerConfig(**hp))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match SpecFormer (missing {missing[:5]}, unexpected {unexpected[:5]})")
    head = ckpt.get("emb_head") if isinstance(ckpt, dict) else None
    model.emb_lnwindows, model.emb_centre, model.emb_whiten, model.emb_info = None, None, None, {}
    # a head from before recipe 11 (no line windows, no rest_lnwindows) is not used: the build refits one
    if isinstance(head, dict) and head.get("rest_lnwindows") is not None:
        model.emb_lnwindows = torch.as_tensor(head["rest_lnwindows"], dtype=torch.float64)
        model.emb_centre = torch.as_tensor(head["centre"], dtype=torch.float32)
        model.emb_whiten = torch.as_tensor(head["whiten"], dtype=torch.float32)
        model.emb_info = dict(head["info"])
    model.eval()
    return model
