"""The column contract: every column of every staging table, with type and unit.

This module is the single source of truth for what the ``ard`` view exposes.
The build writes each layer's zero-row ``_schema.parquet`` from it, the views
are generated from it (a layer that has not run gives typed NULL columns),
and ``ard_meta`` records units and descriptions from it.

Names follow the appendix of the project's blueprint (a design document kept
outside this repository; the column list here is what the code honours):
``TargetID, RA, DEC, Z``, ``LogMass_p50`` ..., errors end in ``_err``, flags in
``_flag``. DuckDB column names are case-insensitive, so ``TARGETID`` and
``TargetID`` are one column.

Types are DuckDB type names. ``WEB_CLASS`` is the ENUM created in
``sql/types.sql``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One column of a staging table."""

    name: str
    """Column name as the user sees it in the ``ard`` view."""
    type: str
    """DuckDB type, e.g. ``DOUBLE``, ``FLOAT[768]``, ``WEB_CLASS``."""
    unit: str = ""
    """Physical unit (astropy-parsable where possible); empty for dimensionless."""
    description: str = ""
    """One line a researcher can read."""


def _c(name: str, type_: str, unit: str = "", description: str = "") -> Column:
    return Column(name, type_, unit, description)


def _with_err(name: str, type_: str, unit: str, description: str) -> list[Column]:
    return [_c(name, type_, unit, description), _c(f"{name}_err", type_, unit, f"1-sigma error of {name}")]


def _percentiles(name: str, unit: str, description: str) -> list[Column]:
    return [_c(f"{name}_p{p}", "DOUBLE", unit, f"{description}: posterior {p}th percentile") for p in (16, 50, 84)]


NANOMAGGY = "nanomaggy"
FLUX_DENSITY = "1e-17 erg / (s cm2 Angstrom)"
LINE_FLUX = "1e-17 erg / (s cm2)"
KMS = "km / s"

# ---------------------------------------------------------------- core (ingest)
CORE_COLUMNS: list[Column] = [
    _c("TargetID", "BIGINT", "", "Unique DESI target identifier (TARGETID)"),
    _c("RA", "DOUBLE", "deg", "Right ascension (ICRS), from the FIBERMAP TARGET_RA"),
    _c("DEC", "DOUBLE", "deg", "Declination (ICRS), from the FIBERMAP TARGET_DEC"),
    _c("Z", "DOUBLE", "", "Redrock redshift"),
    _c("ZERR", "DOUBLE", "", "Redrock redshift error"),
    _c("ZWARN", "BIGINT", "", "Redrock warning bitmask (0 = no problem)"),
    _c("CHI2", "DOUBLE", "", "Redrock best-fit chi2"),
    _c("DELTACHI2", "DOUBLE", "", "Redrock chi2 difference to the second-best fit"),
    _c("SPECTYPE", "VARCHAR", "", "Redrock spectral type (GALAXY, QSO, STAR)"),
    _c("SUBTYPE", "VARCHAR", "", "Redrock spectral subtype"),
    _c("SURVEY", "VARCHAR", "", "DESI survey of the primary spectrum (main, sv1, sv3, ...)"),
    _c("PROGRAM", "VARCHAR", "", "DESI program of the primary spectrum (bright, dark, ...)"),
    _c("HEALPIX", "INTEGER", "", "HEALPix pixel, nside 64, NESTED (as DESI healpix coadds)"),
    *[_c(f"FLUX_{b}", "FLOAT", NANOMAGGY, f"Legacy Surveys {b} flux") for b in ("G", "R", "Z", "W1", "W2")],
    *[_c(f"FLUX_IVAR_{b}", "FLOAT", f"{NANOMAGGY}-2", f"Inverse variance of FLUX_{b}") for b in ("G", "R", "Z", "W1", "W2")],
    _c("EBV", "FLOAT", "mag", "Galactic E(B-V) (SFD)"),
    _c("DESI_TARGET", "BIGINT", "", "Main-survey DESI targeting bitmask (or the survey's own, e.g. SV1_DESI_TARGET)"),
    _c("BGS_TARGET", "BIGINT", "", "BGS targeting bitmask"),
    _c("MWS_TARGET", "BIGINT", "", "MWS targeting bitmask"),
    _c("SCND_TARGET", "BIGINT", "", "Secondary targeting bitmask"),
    _c("TARGET_CLASS", "VARCHAR", "", "Decoded target class: BGS, LRG, ELG, QSO, MWS or other"),
    _c("SNR_Median", "FLOAT", "", "Median of flux*sqrt(ivar) over good pixels of the brz spectrum"),
    _c("SNR_B", "FLOAT", "", "Median S/N per pixel in the b arm"),
    _c("SNR_R", "FLOAT", "", "Median S/N per pixel in the r arm"),
    _c("SNR_Z", "FLOAT", "", "Median S/N per pixel in the z arm"),
    *[_c(f"TSNR2_{t}", "FLOAT", "", f"Template S/N squared for {t} (redrock TSNR2 HDU)") for t in ("BGS", "LRG", "ELG", "QSO", "LYA")],
    _c("N_SPECTRA", "SMALLINT", "", "Number of spectra of this target found in the sources"),
    _c("SPEC_FILE", "VARCHAR", "", "Spectra store file, relative to the ARD folder"),
    _c("SPEC_ROW", "INTEGER", "", "Row of this target in SPEC_FILE"),
    _c("SOURCE_FILE", "VARCHAR", "", "Coadd file the primary spectrum came from"),
]

# ---------------------------------------------------------------- lick
_LICK_INDICES: list[tuple[str, str, str]] = [
    ("Dn4000", "", "4000 A break, narrow (Balogh et al. 1999), F_nu ratio"),
    ("D4000", "", "4000 A break, wide (Bruzual 1983), F_nu ratio"),
    ("Hdelta_A", "Angstrom", "Lick HdeltaA (Worthey & Ottaviani 1997)"),
    ("Hgamma_A", "Angstrom", "Lick HgammaA (Worthey & Ottaviani 1997)"),
    ("Fe4383", "Angstrom", "Lick Fe4383 (Worthey et al. 1994)"),
    ("Mgb", "Angstrom", "Lick Mgb (Worthey et al. 1994)"),
    ("Fe5270", "Angstrom", "Lick Fe5270 (Worthey et al. 1994)"),
    ("Fe5335", "Angstrom", "Lick Fe5335 (Worthey et al. 1994)"),
    ("Fe_mean", "Angstrom", "<Fe> = (Fe5270 + Fe5335) / 2"),
    ("MgFe_prime", "Angstrom", "[MgFe]' = sqrt(Mgb (0.72 Fe5270 + 0.28 Fe5335)) (Thomas et al. 2003)"),
]
LICK_COLUMNS: list[Column] = [
    _c("TargetID", "BIGINT"),
    *[col for name, unit, desc in _LICK_INDICES for col in _with_err(name, "DOUBLE", unit, desc + ", at the spectrum's own resolution")],
    _c("Lick_flag", "INTEGER", "", "Bitmask: which indices are NULL and why (see ard_sql.science.lick.FLAGS)"),
]

# ---------------------------------------------------------------- ppxf
PPXF_LINES: list[str] = [
    "OII_3726", "OII_3729", "Hdelta", "Hgamma", "Hbeta", "OIII_4959", "OIII_5007",
    "NII_6548", "Halpha", "NII_6584", "SII_6716", "SII_6731",
]
PPXF_COLUMNS: list[Column] = [
    _c("TargetID", "BIGINT"),
    *_with_err("VelDisp", "DOUBLE", KMS, "Stellar velocity dispersion sigma (pPXF)"),
    *_with_err("V_star", "DOUBLE", KMS, "Stellar velocity relative to the redshift Z; |V_star| > 300 km/s sets PPXF_flag bit 1024 V_STAR_OFFSET (kept, kinematics suspect)"),
    *_with_err("V_gas_balmer", "DOUBLE", KMS, "Balmer-line gas velocity relative to Z"),
    *_with_err("Sigma_gas_balmer", "DOUBLE", KMS, "Balmer-line gas velocity dispersion"),
    *_with_err("V_gas_forbidden", "DOUBLE", KMS, "Forbidden-line gas velocity relative to Z"),
    *_with_err("Sigma_gas_forbidden", "DOUBLE", KMS, "Forbidden-line gas velocity dispersion"),
    *[col for line in PPXF_LINES for col in _with_err(f"{line}_Flux", "DOUBLE", LINE_FLUX, f"{line} emission-line flux (pPXF)")],
    *_with_err("Gas_Av", "DOUBLE", "mag", "Gas attenuation A_V from the Balmer decrement in the pPXF fit; not clipped at 0: a noisy decrement below the intrinsic 2.86 gives a negative value (keeps sample means unbiased; compare with Gas_Av_err)"),
    _c("PPXF_Chi2", "DOUBLE", "", "Reduced chi2 of the pPXF fit"),
    _c("PPXF_mode", "VARCHAR", "", "'reference' (pPXF) or 'fast' (batched fitter)"),
    _c("PPXF_flag", "INTEGER", "", "Bitmask: fit failures, suspect kinematics (1024: |V_star| > 300 km/s) and lines outside coverage (see ard_sql.science.kinematics.FLAGS, docs/reference.md)"),
]

# ---------------------------------------------------------------- bagpipes / amortized physics
BAGPIPES_COLUMNS: list[Column] = [
    _c("TargetID", "BIGINT"),
    *_percentiles("LogMass", "dex(solMass)", "log10 surviving stellar mass: living stars and remnants (Bagpipes stellar_mass), not the mass formed"),
    *_percentiles("SFR", "solMass / yr", "Star-formation rate averaged over 100 Myr; floored at 1e-5 solMass/yr (a value at the floor reads: below it)"),
    *_percentiles("sSFR", "dex(1 / yr)", "log10 specific SFR (100 Myr), its own marginal posterior (not log10 SFR - LogMass of the medians); floored at -15 (a value at the floor reads: below it)"),
    *_percentiles("Age", "Gyr", "Mass-weighted stellar age"),
    *_percentiles("Dust_Av", "mag", "Calzetti V-band attenuation"),
    *_percentiles("Metallicity", "", "Stellar metallicity Z/Zsun; weakly constrained (intervals mostly the prior's, docs/physics.md)"),
    *_percentiles("Tau", "Gyr", "Delayed-tau e-folding time; weakly constrained (intervals mostly the prior's, docs/physics.md)"),
    *_percentiles("t_quench", "Gyr", "Quenching time (lookback; negative: not yet quenched, read only the sign); docs/physics.md"),
    _c("Physics_Source", "VARCHAR", "", "'bagpipes' (nested-sampling fit), 'amortized' (neural posterior) or 'synthetic' (ard synth-catalog: drawn, not fitted)"),
    _c("Bagpipes_flag", "INTEGER", "", "Bitmask: fit failed / not converged / out of prior"),
]

# ---------------------------------------------------------------- embeddings
# emb_astro: the SpecFormer (AstroCLIP) tokens pooled in rest-frame regions and projected on 768
# principal directions (ard_sql/science/specformer.py).
EMB_ASTRO_DIM = 768
EMB_SHEN_DIM = 768
EMBED_COLUMNS: list[Column] = [
    _c("TargetID", "BIGINT"),
    _c("emb_astro", f"FLOAT[{EMB_ASTRO_DIM}]", "", "AstroCLIP-compatible SpecFormer embedding, rest-frame head (N and the range in ard_meta; NULL without a usable Z)"),
    _c("emb_shen", f"FLOAT[{EMB_SHEN_DIM}]", "", "Resolution-agnostic wavelength-aware spectral embedding"),
]

# ---------------------------------------------------------------- topology
WEB_CLASSES: list[str] = ["Void", "Sheet", "Filament", "Knot"]
TOPOLOGY_COLUMNS: list[Column] = [
    _c("TargetID", "BIGINT"),
    _c("Web_Class", "WEB_CLASS", "", "T-web class: Void, Sheet, Filament, Knot (codes 0-3 in Web_Class_Code)"),
    _c("Web_Class_Code", "TINYINT", "", "T-web class code: 0 Void, 1 Sheet, 2 Filament, 3 Knot"),
    _c("Dist_Filament", "DOUBLE", "Mpc", "Comoving distance to the nearest filament segment of the persistence-filtered skeleton"),
    _c("Sigma_5", "DOUBLE", "Mpc-2", "Projected density 5 / (pi d_5^2), neighbours within +-1000 km/s (Baldry et al. 2006); "
       "NULL with Topology_flag 8 where fewer than 5 other tracers lie within +-1000 km/s"),
    _c("Sigma_10", "DOUBLE", "Mpc-2", "Projected density 10 / (pi d_10^2), neighbours within +-1000 km/s; "
       "NULL with Topology_flag 8 where fewer than 10 other tracers lie within +-1000 km/s"),
    _c("Density_kNN3D", "DOUBLE", "Mpc-3", "3D kNN density estimate (5th neighbour by default); NULL with Topology_flag 8 "
       "only where the survey has no more than knn tracers"),
    _c("Topology_flag", "INTEGER", "", "Bitmask (see ard_sql.build.layers.topology.FLAG_MEANINGS): 1 not a galaxy, 2 T-web masked, "
       "4 Sigma_N circle leaves the footprint, 8 fewer than 10 other tracers within +-dv_kms (Sigma_10 NULL; fewer than 5: Sigma_5 NULL too) "
       "or no more than knn tracers in the survey (Density_kNN3D NULL), 16 unreliable or out-of-range redshift, "
       "32 too few tracers, 64 no filament skeleton, 128 coincident neighbours (infinite density), "
       "256 too sparse for the T-web (Web_Class, Dist_Filament NULL), 512 tide mostly outside the survey (Web_Class NULL), 1024 a nearer filament may lie outside the survey (Dist_Filament NULL)"),
]

#: Every staging table, in the order the ``ard`` view joins them.
LAYER_COLUMNS: dict[str, list[Column]] = {
    "core": CORE_COLUMNS,
    "lick": LICK_COLUMNS,
    "ppxf": PPXF_COLUMNS,
    "bagpipes": BAGPIPES_COLUMNS,
    "embed": EMBED_COLUMNS,
    "topology": TOPOLOGY_COLUMNS,
}


#: The compacted Swiss Army table (``build/compaction.py``): every column of every layer.
WIDE = "wide"


def columns(layer: str) -> list[Column]:
    """Return the declared columns of one staging table (or of ``wide``), ``TargetID`` first."""
    if layer == WIDE:
        return all_columns()
    try:
        return LAYER_COLUMNS[layer]
    except KeyError:
        raise KeyError(f"unknown layer {layer!r}; known: {', '.join(LAYER_COLUMNS)}") from None


def all_columns() -> list[Column]:
    """Every column of the ``ard`` view, ``TargetID`` once, in join order."""
    seen: set[str] = set()
    out: list[Column] = []
    for cols in LAYER_COLUMNS.values():
        for col in cols:
            if col.name.lower() not in seen:
                seen.add(col.name.lower())
                out.append(col)
    return out
