"""The common DESI brz wavelength grid and the three spectrograph arms.

DESI coadds put the b, r and z arms on one linear grid in vacuum Angstrom
(3600-9824 A in 0.8 A steps); the arms overlap at 5760-5800 A and 7520-7620 A.
Every spectrum in the ARD's spectra store lives on this grid.
"""

from __future__ import annotations

import numpy as np

WAVE_MIN = 3600.0
WAVE_MAX = 9824.0
DWAVE = 0.8
NPIX = int(round((WAVE_MAX - WAVE_MIN) / DWAVE)) + 1  # 7781

#: Nominal arm ranges (vacuum Angstrom), as in DESI coadd files.
ARMS: dict[str, tuple[float, float]] = {
    "B": (3600.0, 5800.0),
    "R": (5760.0, 7620.0),
    "Z": (7520.0, 9824.0),
}

#: Typical DESI resolving power at the arm centres, used when a file has no
#: RESOLUTION HDU (DESI instrument paper, Fig. 33).
ARM_RESOLUTION: dict[str, float] = {"B": 2500.0, "R": 3800.0, "Z": 4500.0}


def brz_wavelength() -> np.ndarray:
    """Return the common brz grid (vacuum Angstrom), float64, length NPIX."""
    return WAVE_MIN + DWAVE * np.arange(NPIX, dtype=np.float64)


def arm_wavelength(arm: str) -> np.ndarray:
    """Return the wavelength grid of one arm ('B', 'R' or 'Z') on the brz grid."""
    lo, hi = ARMS[arm.upper()]
    n = int(round((hi - lo) / DWAVE)) + 1
    return lo + DWAVE * np.arange(n, dtype=np.float64)


def arm_slice(arm: str) -> slice:
    """Return the slice of the brz grid covered by one arm."""
    lo, hi = ARMS[arm.upper()]
    i0 = int(round((lo - WAVE_MIN) / DWAVE))
    i1 = int(round((hi - WAVE_MIN) / DWAVE)) + 1
    return slice(i0, i1)
