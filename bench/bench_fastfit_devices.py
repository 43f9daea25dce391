"""Fast mode (the batched pPXF-like fitter) on the CPU and on a GPU, on the same spectra.

The fast fitter runs on a CUDA GPU whenever torch sees one (``FastFitter``'s
device defaults to it), and a failed batch becomes NULLs and flags rather than
a crashed build, so a GPU-only fault would pass silently. This benchmark fits
the same template-made spectra (``kinematics.synthetic_sample``, known truth) on
the CPU and on each device asked for, and prints per device the time per
spectrum, the NULL count and the agreement with the truth, and between the
devices the agreement of VelDisp and the line fluxes.

    python bench/bench_fastfit_devices.py --n 256 --cpu-n 64                  # here: CPU only
    # a machine with a GPU and only numpy, scipy and torch (the template file carried):
    python bench/bench_fastfit_devices.py --templates tpl.npz --n 2048 --cpu-n 256 --batch 64 512 --threads 16

The CPU runs ``--cpu-n`` of the spectra at the layer's batch size (64) with
``--threads`` torch threads; each GPU run fits all ``--n`` with the given batch
sizes, after a warm-up, timed between device synchronisations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run(fitter, data, rows: slice) -> tuple[dict, float]:
    """Fit ``rows``; returns the result columns and the wall time (device synchronised)."""
    import torch

    wave, flux, ivar, lsf, z = data[:5]
    sync = torch.cuda.synchronize if fitter.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    res = fitter.fit(wave, flux[rows], ivar[rows], None, lsf[rows], z[rows])
    sync()
    return res.columns, time.perf_counter() - t0


def compare(a: dict, b: dict, names: list[str]) -> dict:
    """Median and worst relative difference of VelDisp, and median of the line fluxes (both finite, b's S/N > 10)."""
    s_a, s_b = a["VelDisp"], b["VelDisp"]
    ok = np.isfinite(s_a) & np.isfinite(s_b)
    d = np.abs(s_a[ok] - s_b[ok]) / s_b[ok]
    fl = []
    for nm in names:
        fa, fb, eb = a[f"{nm}_Flux"], b[f"{nm}_Flux"], b[f"{nm}_Flux_err"]
        good = np.isfinite(fa) & np.isfinite(fb) & (fb / eb > 10)
        fl.extend(np.abs(fa[good] - fb[good]) / np.abs(fb[good]))
    return {"n": int(ok.sum()), "veldisp_median": float(np.median(d)) if d.size else None,
            "veldisp_max": float(d.max()) if d.size else None,
            "flux_median": float(np.median(fl)) if fl else None, "flux_n": len(fl)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--templates", type=Path, help="template .npz (default: the cached BC03 build; needs the package)")
    ap.add_argument("--n", type=int, default=256, help="spectra fitted on each GPU setting")
    ap.add_argument("--cpu-n", type=int, default=64, help="of them, fitted on the CPU too")
    ap.add_argument("--batch", type=int, nargs="*", default=[64], help="GPU batch sizes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the CPU run")
    ap.add_argument("--out", type=Path, help="write the summary (JSON) here")
    args = ap.parse_args()

    import torch
    from standalone import science

    fastfit, kinematics = science("fastfit", "kinematics")
    if args.templates is None:
        (templates,) = science("templates")
        args.templates = templates.template_file(None)
    data = kinematics.synthetic_sample(args.templates, args.n)
    sigma_true = data[5]
    summary: dict = {"n": args.n, "cpu_n": args.cpu_n, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "runs": {}}
    cpu = fastfit.FastFitter(args.templates, device="cpu", threads=args.threads)
    run(cpu, data, slice(0, 2))  # warm-up
    cols_cpu, t_cpu = run(cpu, data, slice(0, args.cpu_n))

    def truth(cols: dict, n: int) -> dict:
        s = cols["VelDisp"]
        ok = np.isfinite(s)
        return {"null": int((~ok).sum()), "veldisp_bias_vs_truth": float(np.median(s[ok] / sigma_true[:n][ok] - 1))}

    summary["runs"]["cpu"] = {"ms_per_spectrum": 1000 * t_cpu / args.cpu_n, "threads": args.threads, **truth(cols_cpu, args.cpu_n)}
    print("cpu", json.dumps(summary["runs"]["cpu"]), flush=True)
    if torch.cuda.is_available():
        for bs in args.batch:
            gpu = fastfit.FastFitter(args.templates, device="cuda", batch_size=bs)
            run(gpu, data, slice(0, min(bs, args.n)))  # warm-up: kernels, cuFFT plans
            cols, t = run(gpu, data, slice(0, args.n))
            head = {k: v[: args.cpu_n] for k, v in cols.items()}
            summary["runs"][f"cuda batch {bs}"] = {"ms_per_spectrum": 1000 * t / args.n, **truth(cols, args.n),
                                                   "vs_cpu": compare(head, cols_cpu, list(kinematics.LINE_NAMES)),
                                                   "speedup_vs_cpu": (t_cpu / args.cpu_n) / (t / args.n)}
            print(f"cuda batch {bs}", json.dumps(summary["runs"][f"cuda batch {bs}"]), flush=True)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
