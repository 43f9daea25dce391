"""Dn4000, D4000 and Lick indices for a batch of spectra (a compiled loop: no Python loop per spectrum).

Definitions (rest-frame Angstrom, as published, in AIR):

- ``Dn4000``: Balogh et al. 1999, ApJ 527, 54: <F_nu>(4000-4100) / <F_nu>(3850-3950).
- ``D4000``: Bruzual 1983, ApJ 273, 105: <F_nu>(4050-4250) / <F_nu>(3750-3950).
- ``Hdelta_A``, ``Hgamma_A``: Worthey & Ottaviani 1997, ApJS 111, 377, Table 1.
- ``Fe4383``, ``Mgb``, ``Fe5270``, ``Fe5335``: Worthey et al. 1994, ApJS 94, 687, with the
  refined band passes of Trager et al. 1998, ApJS 116, 1, Table 2.
- ``Fe_mean`` = (Fe5270 + Fe5335) / 2 (Gorgas et al. 1990);
  ``MgFe_prime`` = sqrt(Mgb (0.72 Fe5270 + 0.28 Fe5335)) (Thomas, Maraston & Bender 2003).

Conventions:

- DESI spectra are in vacuum. Band edges are converted air -> vacuum (``air_to_vac``,
  the IAU standard of Morton 2000 / Ciddor 1996) and then to the observed frame with
  ``(1 + z)``; the data are never resampled. Equivalent widths are returned in
  rest-frame vacuum Angstrom.
- The spectrum is the piecewise-linear interpolant of its pixels; every band average
  and the central-band integral of ``1 - F/F_cont`` are integrated exactly over the
  band edges (partial pixels included), as pylick's ``exact`` method does with
  quadrature. Each quantity is therefore a fixed linear functional of the pixels,
  which makes the error propagation exact to first order.
- The pseudo-continuum is the straight line through the mean fluxes of the blue and
  red side bands, anchored at the band mid-points (Worthey et al. 1994).
- Errors: first-order propagation of the pixel variances ``1/ivar`` through the
  index definition, including the covariance between overlapping bands and between
  the indices of a composite (Cardiel et al. 1998, A&AS 127, 597, Sect. 3).
- Bad pixels (``ivar <= 0``, ``mask != 0`` or non-finite flux) are replaced by linear
  interpolation between their nearest good neighbours (their error flows to those
  neighbours), searched within the region that holds the bands (rest 3751-4457 A or
  5144-5365 A, :data:`_SEGMENTS`); with no good pixel on one side, the other side's value.
  A band whose bad fraction exceeds ``max_bad_frac`` gives NaN and a ``BAD_PIXELS``
  flag; a band outside the spectrum's wavelength range at that redshift gives NaN and
  ``NO_COVERAGE``; a non-positive continuum gives NaN and ``BAD_CONTINUUM``.
- The indices are measured at the spectrum's own resolution (no broadening to Lick/IDS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ard_sql.science import lick_kernel  # the compiled inner loop (numba)

if TYPE_CHECKING:  # annotations only: pyarrow is imported where the Arrow output is made
    import pyarrow as pa

# ---------------------------------------------------------------- band definitions


@dataclass(frozen=True)
class IndexDef:
    """One spectral index: its bands (rest-frame Angstrom) and how it is measured."""

    name: str
    """Column name in the contract (``ard_sql.contract.LICK_COLUMNS``)."""
    kind: str
    """``'ew'`` (equivalent width in Angstrom) or ``'break'`` (ratio of mean F_nu)."""
    blue: tuple[float, float]
    """Blue pseudo-continuum band (break: the blue window)."""
    red: tuple[float, float]
    """Red pseudo-continuum band (break: the red window)."""
    central: tuple[float, float] | None = None
    """Central (feature) band; ``None`` for a break."""
    air: bool = True
    """True when the published band edges are air wavelengths."""
    reference: str = ""


#: The measured indices, in flag-bit order. Edges copied from the papers cited.
INDICES: tuple[IndexDef, ...] = (
    IndexDef("Dn4000", "break", (3850.0, 3950.0), (4000.0, 4100.0), reference="Balogh et al. 1999, ApJ 527, 54"),
    IndexDef("D4000", "break", (3750.0, 3950.0), (4050.0, 4250.0), reference="Bruzual 1983, ApJ 273, 105"),
    IndexDef("Hdelta_A", "ew", (4041.600, 4079.750), (4128.500, 4161.000), (4083.500, 4122.250),
             reference="Worthey & Ottaviani 1997, ApJS 111, 377"),
    IndexDef("Hgamma_A", "ew", (4283.500, 4319.750), (4367.250, 4419.750), (4319.750, 4363.500),
             reference="Worthey & Ottaviani 1997, ApJS 111, 377"),
    IndexDef("Fe4383", "ew", (4359.125, 4370.375), (4442.875, 4455.375), (4369.125, 4420.375),
             reference="Worthey et al. 1994, ApJS 94, 687; Trager et al. 1998, ApJS 116, 1"),
    IndexDef("Mgb", "ew", (5142.625, 5161.375), (5191.375, 5206.375), (5160.125, 5192.625),
             reference="Worthey et al. 1994, ApJS 94, 687; Trager et al. 1998, ApJS 116, 1"),
    IndexDef("Fe5270", "ew", (5233.150, 5248.150), (5285.650, 5318.150), (5245.650, 5285.650),
             reference="Worthey et al. 1994, ApJS 94, 687; Trager et al. 1998, ApJS 116, 1"),
    IndexDef("Fe5335", "ew", (5304.625, 5315.875), (5353.375, 5363.375), (5312.125, 5352.125),
             reference="Worthey et al. 1994, ApJS 94, 687; Trager et al. 1998, ApJS 116, 1"),
)
INDEX_BY_NAME: dict[str, IndexDef] = {d.name: d for d in INDICES}

#: Composite indices (name -> description); NaN whenever a component is NaN.
COMPOSITES: dict[str, str] = {
    "Fe_mean": "(Fe5270 + Fe5335) / 2",
    "MgFe_prime": "sqrt(Mgb * (0.72 Fe5270 + 0.28 Fe5335)); NaN if the product is negative (bit MgFe_prime_NOT_POSITIVE)",
}

# ---------------------------------------------------------------- flags

_REASONS: dict[str, str] = {
    "NO_COVERAGE": "a band lies outside the spectrum's wavelength range at this redshift (or Z is missing)",
    "BAD_PIXELS": "a band has more than max_bad_frac of its width in masked / zero-ivar pixels",
    "BAD_CONTINUUM": "the (pseudo-)continuum is not positive or not finite",
}

#: Flag bits of ``Lick_flag``: ``"<index>_<REASON>" -> bit value``; 3 bits per index.
FLAGS: dict[str, int] = {
    f"{d.name}_{reason}": 1 << (3 * i + j) for i, d in enumerate(INDICES) for j, reason in enumerate(_REASONS)
}
FLAGS["MgFe_prime_NOT_POSITIVE"] = 1 << lick_kernel.MGFE_NOT_POSITIVE_BIT
#: Human-readable description of every flag bit.
FLAG_DESCRIPTIONS: dict[str, str] = {
    **{f"{d.name}_{reason}": f"{d.name} is NULL: {text}" for d in INDICES for reason, text in _REASONS.items()},
    "MgFe_prime_NOT_POSITIVE": "Mgb x (0.72 Fe5270 + 0.28 Fe5335) <= 0 (a line in emission): MgFe_prime is NULL "
                               "when it is negative, MgFe_prime_err when it is 0",
}


def describe_flags(flag: int) -> list[str]:
    """Names of the bits set in a ``Lick_flag`` value."""
    return [name for name, bit in FLAGS.items() if int(flag) & bit]


def output_names() -> list[str]:
    """Value and error names returned by :func:`measure_indices`, in contract order."""
    names = [d.name for d in INDICES] + list(COMPOSITES)
    return [n for name in names for n in (name, f"{name}_err")] + ["Lick_flag"]


# ---------------------------------------------------------------- air / vacuum


def air_to_vac(wave_air: np.ndarray | float) -> np.ndarray:
    """Air -> vacuum wavelength (Angstrom) for lambda > 2000 A.

    The inverse of the IAU standard vacuum->air conversion (Morton 2000, ApJS 130, 403,
    eq. 3, after Ciddor 1996) in the form of N. Piskunov (VALD), accurate to < 1e-4 A.
    """
    wave_air = np.asarray(wave_air, dtype=np.float64)
    s2 = (1e4 / wave_air) ** 2
    n = 1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2) + 1.599740894897e-4 / (38.92568793293 - s2)
    return wave_air * n


def vac_to_air(wave_vac: np.ndarray | float) -> np.ndarray:
    """Vacuum -> air wavelength (Angstrom), IAU standard (Morton 2000, eq. 3; Ciddor 1996)."""
    wave_vac = np.asarray(wave_vac, dtype=np.float64)
    s2 = (1e4 / wave_vac) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return wave_vac / n


def vacuum_bands(d: IndexDef) -> dict[str, tuple[float, float]]:
    """Rest-frame vacuum edges of an index's bands (``blue``, ``red``, maybe ``central``)."""
    bands = {"blue": d.blue, "red": d.red}
    if d.central is not None:
        bands["central"] = d.central
    if not d.air:
        return bands
    return {k: (float(air_to_vac(lo)), float(air_to_vac(hi))) for k, (lo, hi) in bands.items()}


#: Rest-frame vacuum band edges of every index (computed once).
VACUUM_BANDS: dict[str, dict[str, tuple[float, float]]] = {d.name: vacuum_bands(d) for d in INDICES}

# ---------------------------------------------------------------- measurement


def _check_inputs(wave, flux, ivar, mask, z) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    wave = np.asarray(wave, dtype=np.float64)
    flux = np.atleast_2d(np.asarray(flux))
    ivar = np.atleast_2d(np.asarray(ivar))
    z = np.atleast_1d(np.asarray(z, dtype=np.float64))
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D (npix,), got shape {wave.shape}")
    npix = wave.size
    if flux.ndim != 2 or flux.shape[1] != npix or ivar.shape != flux.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must both be (n, {npix}) to match wave")
    if z.shape != (flux.shape[0],):
        raise ValueError(f"z must be (n,) = ({flux.shape[0]},), got {z.shape}")
    if npix < 2 or not np.all(np.diff(wave) > 0):
        raise ValueError("wave must be strictly increasing with at least 2 pixels")
    if mask is not None:
        mask = np.atleast_2d(np.asarray(mask))
        if mask.shape != flux.shape:
            raise ValueError(f"mask {mask.shape} must match flux {flux.shape}")
    return wave, flux, ivar, mask, z


def measure_indices(
    wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    z: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    max_bad_frac: float = 0.25,
) -> dict[str, np.ndarray]:
    """Measure every index of :data:`INDICES` (+ composites) on a batch of spectra.

    Parameters
    ----------
    wave : (npix,) observed-frame VACUUM wavelengths in Angstrom, strictly increasing
        (any sampling: linear, log-linear or irregular).
    flux : (n, npix) F_lambda (any unit; the indices are scale-free).
    ivar : (n, npix) inverse variance of ``flux``; ``<= 0`` marks a bad pixel.
    z : (n,) redshift; NaN gives NULL indices with ``NO_COVERAGE``.
    mask : optional (n, npix) integer mask; non-zero marks a bad pixel.
    max_bad_frac : largest fraction of any band's width allowed in bad pixels.

    Returns
    -------
    dict of (n,) arrays: ``<index>``, ``<index>_err`` (float64, NaN when not measured)
    and ``Lick_flag`` (int32, see :data:`FLAGS`), in :func:`output_names` order.
    """
    wave, flux, ivar, mask, z = _check_inputs(wave, flux, ivar, mask, z)
    n = flux.shape[0]
    zok = np.isfinite(z) & (z > -1)
    zp1 = 1.0 + np.where(zok, z, 0.0)
    values = np.empty((n, len(INDICES)))
    errors = np.empty((n, len(INDICES)))
    flags = np.zeros(n, dtype=np.int64)
    comp = np.empty((n, 4))
    # The kernel reads the arrays as they come (float32 from the store; no float64 copy).
    flux = np.ascontiguousarray(flux)
    ivar = np.ascontiguousarray(ivar)
    mask_arr = np.ascontiguousarray(mask) if mask is not None else np.zeros((0, wave.size), np.uint8)
    lick_kernel.measure_batch(wave, flux, ivar, mask_arr, zp1, zok, _BANDS, _KINDS, _SEGMENTS, float(max_bad_frac),
                              _COMPOSITE, values, errors, flags, comp)
    out: dict[str, np.ndarray] = {}
    for k, d in enumerate(INDICES):
        out[d.name], out[f"{d.name}_err"] = values[:, k], errors[:, k]
    for j, name in enumerate(COMPOSITES):
        out[name], out[f"{name}_err"] = comp[:, 2 * j], comp[:, 2 * j + 1]
    out["Lick_flag"] = flags.astype(np.int32)
    return {name: out[name] for name in output_names()}


_INDEX_POS: dict[str, int] = {d.name: i for i, d in enumerate(INDICES)}
#: Band edges (rest vacuum, rows blue / red / central) and kinds in the kernel's layout.
_BANDS = np.array([[VACUUM_BANDS[d.name]["blue"], VACUUM_BANDS[d.name]["red"],
                    VACUUM_BANDS[d.name].get("central", (0.0, 0.0))] for d in INDICES], dtype=np.float64)
_KINDS = np.array([lick_kernel.BREAK if d.kind == "break" else lick_kernel.EW for d in INDICES], dtype=np.int64)
_COMPOSITE = np.array([_INDEX_POS["Mgb"], _INDEX_POS["Fe5270"], _INDEX_POS["Fe5335"]], dtype=np.int64)


def _segments(gap: float = 50.0) -> np.ndarray:
    """Rest-frame regions holding every band (spans closer than ``gap`` A merged): the pixels read."""
    spans = sorted((min(b[0] for b in VACUUM_BANDS[d.name].values()), max(b[1] for b in VACUUM_BANDS[d.name].values()))
                   for d in INDICES)
    merged = [list(spans[0])]
    for lo, hi in spans[1:]:
        if lo <= merged[-1][1] + gap:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return np.array(merged, dtype=np.float64)


_SEGMENTS = _segments()


# ---------------------------------------------------------------- Arrow output

_ARROW_TYPES = {"BIGINT": "int64", "DOUBLE": "float64", "INTEGER": "int32"}


def lick_arrow_schema() -> pa.Schema:
    """Arrow schema of the ``lick`` staging table (``ard_sql.contract.LICK_COLUMNS``)."""
    import pyarrow as pa

    from ard_sql.contract import LICK_COLUMNS

    return pa.schema([pa.field(c.name, getattr(pa, _ARROW_TYPES[c.type])()) for c in LICK_COLUMNS])


def to_arrow(targetid: np.ndarray, result: dict[str, np.ndarray]) -> pa.Table:
    """Arrow table (TargetID + contract columns) from :func:`measure_indices`; NaN -> NULL."""
    import pyarrow as pa

    schema = lick_arrow_schema()
    arrays = [pa.array(np.asarray(targetid, dtype=np.int64))]
    for field in list(schema)[1:]:
        values = np.asarray(result[field.name])
        if pa.types.is_floating(field.type):
            arrays.append(pa.array(values, type=field.type, mask=~np.isfinite(values)))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
