"""Train the embed layer's two encoders on a GPU, with snapshots of the weights along the way.

How far does longer training take emb_shen and emb_astro, and what does a
change to the recipe do at the layer's step budget? A GPU does in minutes what
takes a 2-core CPU half an hour or more. This
script runs the layer's own training code (``science.shen.train``,
``science.specformer.train``: same recipe, same seed) on a machine with a GPU,
which has torch but none of the build's other dependencies, and saves the
encoder weights at several times. ``bench_embeddings.py --checkpoints`` then
scores every snapshot here, with the embedding head fitted on the layer's
full-precision training sample exactly as a build fits it.

Steps::

    # here: the layer's training sample of a built ARD, packed small enough to travel
    python bench/gpu_embeddings.py pack --ard /tmp/a --out .gpu/mk3.pack
    # on the GPU machine (torch only); writes <out>/<encoder>_<seconds>s.ckpt and log.json
    python bench/gpu_embeddings.py train --pack .gpu/mk3.pack --encoder shen --seconds 360 \\
        --snapshots 45 90 180 --out /tmp/o/mk3
    # here: score each snapshot against the truth and the PCA baseline
    python bench/bench_embeddings.py --ard /tmp/a --mock /tmp/m --checkpoints /tmp/o/mk3

The pack stores flux in units of 0.1 sigma (int16) and ivar on a 1% log grid
(int16), xz-compressed: 2068 spectra x 7781 pixels become 18 MB instead of
129 MB. The quantisation adds 0.03 sigma rms to the flux and moves sigma by at
most 0.25%, far below the noise the encoders are trained with.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import time
from pathlib import Path

import numpy as np

_LOG_STEP = np.log(1.01)
_FLUX_STEP = 0.1
_NO_IVAR = -32768


def pack(ard: Path, out: Path, train_max: int = 4000, min_snr: float = 2.0, seed: int = 0) -> dict:
    """Write the embed layer's training sample of ``ard`` (its defaults) to ``out``; returns sizes."""
    from ard_sql.build.layers.embed import training_sample

    wave, flux, ivar, z = training_sample(ard, train_max, min_snr, seed)
    try:
        flux_q, ivar_q, clipped = quantise(flux, ivar)
    except ValueError as exc:
        raise ValueError(f"{ard}: {exc}") from exc
    buf = io.BytesIO()
    np.savez(buf, wave=wave, z=z, flux_q=flux_q, ivar_q=ivar_q)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(buf.getvalue(), preset=6))
    return {"spectra": int(len(flux)), "pixels": int(flux.shape[1]), "bytes": out.stat().st_size, "clipped": clipped}


def quantise(flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """int16 (flux in steps of 0.1 sigma, ivar on a 1% log grid) and the number of flux values clipped.

    Bad pixels (ivar <= 0 or anything non-finite) keep ivar 0 and flux 0, as
    the encoders read them. Sigma is the quantised one, so ``dequantise`` gives
    flux within 0.05 sigma of the input.
    """
    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    li = np.where(good, np.round(np.log(np.where(good, ivar, 1.0)) / _LOG_STEP), _NO_IVAR)
    if good.any() and (li[good].min() <= _NO_IVAR or li[good].max() > 32767):
        raise ValueError("ivar outside the pack's range (1.01 ** +-32767)")
    li = li.astype(np.int16)
    sigma = 1.0 / np.sqrt(_unquantise_ivar(li).clip(min=1e-300))
    q = np.where(good, np.round(np.where(good, flux, 0.0) / sigma / _FLUX_STEP), 0.0)
    return np.clip(q, -32767, 32767).astype(np.int16), li, int((np.abs(q) > 32767).sum())


def dequantise(flux_q: np.ndarray, ivar_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (flux, ivar) of ``quantise``'s output."""
    ivar = _unquantise_ivar(ivar_q)
    flux = flux_q * _FLUX_STEP / np.sqrt(np.where(ivar > 0, ivar, 1.0))
    return np.where(ivar > 0, flux, 0.0).astype(np.float32), ivar.astype(np.float32)


def _unquantise_ivar(li: np.ndarray) -> np.ndarray:
    return np.where(li > _NO_IVAR, np.exp(li.astype(np.float64) * _LOG_STEP), 0.0)


def unpack(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(wave, flux, ivar, z) float arrays of a pack."""
    d = np.load(io.BytesIO(lzma.decompress(path.read_bytes())))
    return (d["wave"], *dequantise(d["flux_q"], d["ivar_q"]), d["z"])


def train(pack_path: Path, encoder: str, seconds: float, snapshots: list[float], out: Path,
          device: str = "auto", seed: int = 0, steps: int | None = None, noise_weight: float | None = None) -> dict:
    """Train one encoder from a pack for ``seconds`` (or ``steps`` optimizer steps, ``seconds`` then a cap; emb_shen
    with ``noise_weight``: its noise-consistency weight, default the layer's); save its weights at each snapshot time and at the end."""
    import torch

    from standalone import science

    shen, specformer = science("shen", "specformer")
    wave, flux, ivar, z = unpack(pack_path)
    out.mkdir(parents=True, exist_ok=True)
    # as train() seeds before it builds a model: the same initial encoder weights (the
    # training-only rest-frame decoders then start from other random weights: see shen.train)
    torch.manual_seed(seed)
    model = shen.ShenEncoder(shen.SMALL_CONFIG) if encoder == "shen" else specformer.SpecFormer(specformer.SMALL_CONFIG)
    save = shen.save_checkpoint if encoder == "shen" else specformer.save_checkpoint
    name = "shen" if encoder == "shen" else "specformer"
    pending = sorted(snapshots)
    saved: list[dict] = []

    def snap(steps: int, elapsed: float) -> None:
        while pending and elapsed >= pending[0]:
            t = pending.pop(0)
            save(model, out / f"{name}_{t:g}s.ckpt", {"steps": steps, "seconds": elapsed})
            saved.append({"file": f"{name}_{t:g}s.ckpt", "steps": steps, "seconds": elapsed})

    kw = {"epochs": 1_000_000, "steps": steps, "max_seconds": seconds, "seed": seed, "device": device, "callback": snap,
          "model": model}
    t0 = time.perf_counter()
    if encoder == "shen":
        model, log = shen.train(wave, flux, ivar, z=z, **kw, **({} if noise_weight is None else {"noise_weight": noise_weight}))
    else:
        model, log = specformer.train(flux, ivar, wave=wave, z=z, out_dim=768, **kw)
    save(model, out / f"{name}_{seconds:g}s.ckpt", {"steps": log["steps"], "seconds": log["seconds"]})
    saved.append({"file": f"{name}_{seconds:g}s.ckpt", "steps": log["steps"], "seconds": log["seconds"]})
    info = {"encoder": encoder, "device": log["device"], "n_train": log["n_train"], "wall": time.perf_counter() - t0,
            "snapshots": saved, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    (out / f"{name}_log.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack the embed layer's training sample of an ARD")
    p.add_argument("--ard", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train", help="train one encoder from a pack, saving snapshots")
    t.add_argument("--pack", type=Path, required=True)
    t.add_argument("--encoder", choices=["shen", "astro"], required=True)
    t.add_argument("--seconds", type=float, required=True, help="training time budget")
    t.add_argument("--snapshots", type=float, nargs="*", default=[], help="also save the weights at these times (s)")
    t.add_argument("--steps", type=int, help="a step budget (the layer's): --seconds is then only a cap")
    t.add_argument("--noise-weight", type=float, help="emb_shen's noise-consistency weight (default: the layer's; 0: off)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.cmd == "pack":
        print(json.dumps(pack(args.ard, args.out)))
    else:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(train(args.pack, args.encoder, args.seconds, args.snapshots, args.out, args.device,
                               steps=args.steps, noise_weight=args.noise_weight)))


if __name__ == "__main__":
    main()
