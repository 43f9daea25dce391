"""The ppxf layer's columns of a built mock ARD against the mock's truth: bias, scatter and error pulls.

    ard mock --out M --n 3000 --seed 3 && ard build M --out A --layers ppxf
    python bench/bench_ppxf_truth.py --ard A --mock M

For every kinematic column, every line flux and Gas_Av, over the galaxies where the layer gave a
value: N, median offset (bias), 1.4826 x MAD of the offset (scatter), and the same scale of the
pulls (value - truth) / error, which is 1 when the `_err` columns are right; the median pull is the
bias in units of the error, the fair measure for faint lines (where value / truth - 1 is dominated by
noise over a tiny truth). Relative quantities
(VelDisp, gas sigmas, fluxes) are compared as value / truth - 1; velocities and Gas_Av as
differences. Each row is given for all galaxies and for a bright cut (S/N of the value > 10, or,
for kinematics, SNR_Median > 10), as a layer user would select.

Truth, from `truth.parquet`: VelDisp <- SIGMA_STAR; the gas sigmas <- SIGMA_GAS (one per galaxy in
the mock); V_star and both gas velocities <- c (Z_true - Z) / (1 + Z), the offset of the galaxy's
true redshift (peculiar velocity included) from the catalogue Z the fit is relative to (the mock's
gas moves with its stars); each `<line>_Flux` <- the truth's attenuated line flux; Gas_Av <- AV_GAS.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

C_KMS = 299792.458

#: column -> (truth expression on the joined frame, "ratio" or "difference", unit of the offset)
KINEMATICS: dict[str, tuple[str, str, str]] = {
    "VelDisp": ("T_SIGMA_STAR", "ratio", ""),
    "V_star": ("T_V", "difference", "km/s"),
    "V_gas_balmer": ("T_V", "difference", "km/s"),
    "V_gas_forbidden": ("T_V", "difference", "km/s"),
    "Sigma_gas_balmer": ("T_SIGMA_GAS", "ratio", ""),
    "Sigma_gas_forbidden": ("T_SIGMA_GAS", "ratio", ""),
    "Gas_Av": ("T_AV_GAS", "difference", "mag"),
}


def joined(ard: Path, mock: Path) -> pd.DataFrame:
    """The ARD's galaxies with their truth rows (prefixed ``T_``; ``T_V``: the true redshift's velocity offset from Z)."""
    import duckdb

    con = duckdb.connect(str(ard / "ard.duckdb"), read_only=True)
    df = con.sql("SELECT * EXCLUDE (emb_astro, emb_shen) FROM ard WHERE SPECTYPE = 'GALAXY'").df()
    con.close()
    truth = pd.read_parquet(mock / "truth.parquet").query("SPECTYPE == 'GALAXY'")
    truth = truth.rename(columns=lambda c: f"T_{c}")
    df = df.merge(truth, left_on="TargetID", right_on="T_TARGETID", how="inner")
    df["T_V"] = C_KMS * (df.T_Z - df.Z) / (1 + df.Z)
    return df


def _robust(x: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x median absolute deviation."""
    if x.size == 0:
        return float("nan"), float("nan")
    from scipy.stats import median_abs_deviation

    return float(np.median(x)), float(median_abs_deviation(x, scale="normal"))


def compare(value: np.ndarray, err: np.ndarray, truth: np.ndarray, kind: str) -> dict[str, float]:
    """N, bias, scatter and pull width of ``value`` against ``truth`` where all three are finite."""
    ok = np.isfinite(value) & np.isfinite(truth) & np.isfinite(err) & (err > 0)
    if kind == "ratio":
        ok &= truth > 0
    v, e, t = value[ok], err[ok], truth[ok]
    d = v / t - 1 if kind == "ratio" else v - t
    bias, scatter = _robust(d)
    pull_bias, pull = _robust((v - t) / e)
    return {"n": int(ok.sum()), "bias": bias, "scatter": scatter, "pull_bias": pull_bias, "pull_width": pull}


def table(df: pd.DataFrame, line_names: list[str]) -> pd.DataFrame:
    """One row per column and selection (all / bright)."""
    rows = []
    bright_kin = df.SNR_Median.to_numpy(float) > 10
    resolved = bright_kin & (df.T_SIGMA_STAR.to_numpy(float) > 70)  # above DESI's instrumental limit
    for col, (tcol, kind, unit) in KINEMATICS.items():
        v, e, t = (df[c].to_numpy(float) for c in (col, f"{col}_err", tcol))
        sels = [("all", np.ones(len(df), bool)), ("SNR_Median > 10", bright_kin)]
        if col == "VelDisp":
            sels.append(("SNR_Median > 10, true sigma > 70", resolved))
        for sel_name, sel in sels:
            rows.append({"column": col, "selection": sel_name, "offset": "fractional" if kind == "ratio" else unit,
                         **compare(v[sel], e[sel], t[sel], kind)})
    for line in line_names:
        col = f"{line}_Flux"
        v, e, t = (df[c].to_numpy(float) for c in (col, f"{col}_err", f"T_{col}"))
        bright = np.abs(v) > 10 * e
        for sel_name, sel in (("all", np.ones(len(df), bool)), ("flux S/N > 10", bright)):
            rows.append({"column": col, "selection": sel_name, "offset": "fractional",
                         **compare(v[sel], e[sel], t[sel], "ratio")})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ard", type=Path, required=True, help="an ARD built from a mock with the ppxf layer")
    ap.add_argument("--mock", type=Path, required=True, help="the mock survey folder (with truth.parquet)")
    args = ap.parse_args()
    from ard_sql.contract import PPXF_LINES

    df = joined(args.ard, args.mock)
    mode = df.PPXF_mode.dropna().unique().tolist()
    print(f"{len(df)} galaxies, PPXF_mode {mode}; median SNR_Median {df.SNR_Median.median():.2f}")
    with pd.option_context("display.max_rows", 200, "display.width", 160, "display.float_format", "{:.3f}".format):
        print(table(df, PPXF_LINES).to_string(index=False))


if __name__ == "__main__":
    main()
