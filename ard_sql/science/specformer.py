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

State-dict names (``data_embed``, ``position_embed``, ``blocks.i.layernorm1``,
``blocks.i.attention.attention``, ``blocks.i.attention.projection``,
``blocks.i.layernorm2``, ``blocks.i.mlp.encoder``, ``blocks.i.mlp.decoder``,
``final_layernorm``, ``head``) and the Lightning checkpoint layout
(``{"state_dict", "hyper_parameters"}``) match AstroCLIP, so
``load_checkpoint`` reads a published ``specformer.ckpt`` or the full
AstroCLIP checkpoint (prefix ``spectrum_encoder.backbone.``).

The ``emb_astro`` vector of a spectrum is the mean over all tokens of the
final-LayerNorm output (``embed_dim`` numbers: 768 for the AstroCLIP
configuration), zero-padded to ``EMB_ASTRO_DIM`` when a smaller configuration
was trained (zero padding changes no cosine distance).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


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

    def forward_tokens(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode preprocessed tokens; returns ``reconstructions`` and per-token ``embedding``."""
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"{t} tokens exceed max_len {self.config.max_len}")
        x = self.dropout(self.data_embed(tokens) + self.position_embed(torch.arange(t, device=tokens.device)))
        for block in self.blocks:
            x = block(x)
        x = self.final_layernorm(x)
        return {"reconstructions": self.head(x), "embedding": x}

    def forward(self, flux: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocess a (B, L) flux batch and encode it."""
        return self.forward_tokens(self.preprocess(flux))

    def mask_tokens(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Zero ``mask_num_chunks`` runs of ``mask_chunk_width`` tokens, one run per equal section."""
        c = self.config
        b, t, _ = tokens.shape
        section = t // c.mask_num_chunks
        if section <= c.mask_chunk_width:
            raise ValueError(f"{t} tokens are too few to mask {c.mask_num_chunks} chunks of {c.mask_chunk_width}")
        starts = torch.randint(0, section - c.mask_chunk_width, (b, c.mask_num_chunks), generator=generator)
        starts = starts + torch.arange(c.mask_num_chunks) * section
        pos = torch.arange(t)
        masked = ((pos[None, None, :] >= starts[..., None]) & (pos[None, None, :] < starts[..., None] + c.mask_chunk_width)).any(1)
        return tokens.masked_fill(masked[..., None], 0.0)


def fill_bad_pixels(flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
    """Replace pixels with ``ivar <= 0`` or non-finite flux by linear interpolation of good neighbours.

    SpecFormer has no error channel; a masked pixel set to 0 would look like
    an absorption line. Spectra with no good pixel become all-NaN (the caller
    turns them into NULL embeddings).
    """
    flux = np.asarray(flux, dtype=np.float32)
    out = flux.copy()
    good = (np.asarray(ivar) > 0) & np.isfinite(flux)
    x = np.arange(flux.shape[1])
    for i in np.flatnonzero(~good.all(axis=1)):
        g = good[i]
        out[i] = np.interp(x, x[g], flux[i, g]) if g.any() else np.nan
    return out


@torch.no_grad()
def embed(model: SpecFormer, flux: np.ndarray, ivar: np.ndarray | None = None, out_dim: int | None = None,
          batch_size: int = 64) -> np.ndarray:
    """Return (n, out_dim) float32 ``emb_astro`` vectors (mean-pooled tokens, zero-padded); NaN rows for unusable spectra."""
    model.eval()
    flux = np.asarray(flux, np.float32)
    if ivar is not None:
        flux = fill_bad_pixels(flux, ivar)
    d = model.config.embed_dim
    out_dim = out_dim or d
    if out_dim < d:
        raise ValueError(f"SpecFormer width {d} exceeds the emb_astro column width {out_dim}")
    out = np.zeros((len(flux), out_dim), np.float32)
    bad = ~np.isfinite(flux).all(axis=1)
    out[bad] = np.nan
    ok = np.flatnonzero(~bad)
    for i in range(0, len(ok), batch_size):
        idx = ok[i:i + batch_size]
        out[idx, :d] = model(torch.from_numpy(flux[idx]))["embedding"].mean(1).numpy()
    return out


def train(flux: np.ndarray, ivar: np.ndarray | None = None, config: SpecFormerConfig = SMALL_CONFIG, *,
          epochs: int = 3, batch_size: int = 16, lr: float = 3e-4, seed: int = 0,
          max_seconds: float | None = None, model: SpecFormer | None = None) -> tuple[SpecFormer, dict[str, Any]]:
    """Masked-chunk pretraining on (n, L) spectra; returns the model and a log (losses, seconds, steps).

    Deterministic for a given seed and thread count. ``max_seconds`` stops
    training early (recorded in the log) so a CPU build stays bounded.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    flux = np.asarray(flux, np.float32)
    if ivar is not None:
        flux = fill_bad_pixels(flux, ivar)
    flux = flux[np.isfinite(flux).all(axis=1)]
    if len(flux) == 0:
        raise ValueError("SpecFormer training: no spectrum with good pixels")
    model = model or SpecFormer(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = torch.from_numpy(flux)
    t0, losses, steps, stopped = time.perf_counter(), [], 0, False
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        epoch_loss = []
        for i in range(0, len(data), batch_size):
            target = model.preprocess(data[perm[i:i + batch_size]])
            masked = model.mask_tokens(target, gen)
            recon = model.forward_tokens(masked)["reconstructions"]
            locs = (masked != target).to(recon.dtype)
            loss = F.mse_loss(recon * locs, target * locs) / locs.mean().clamp(min=1e-8)
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_loss.append(loss.item())
            steps += 1
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                stopped = True
                break
        losses.append(float(np.mean(epoch_loss)))
        if stopped:
            break
    model.eval()
    return model, {"epoch_loss": losses, "steps": steps, "seconds": time.perf_counter() - t0,
                   "stopped_by_time": stopped, "n_train": int(len(data)), "config": asdict(model.config)}


def save_checkpoint(model: SpecFormer, path: Path | str, extra: dict[str, Any] | None = None) -> None:
    """Save in AstroCLIP's Lightning layout: ``{"state_dict", "hyper_parameters"}`` (+ ``extra``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": asdict(model.config), **(extra or {})}, tmp)
    tmp.replace(path)


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
    model.eval()
    return model
