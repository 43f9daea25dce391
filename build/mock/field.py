"""A cosmic web on a light cone: Gaussian field, Zel'dovich evolution, T-web, biased galaxies.

* Linear P(k): Eisenstein & Hu (1998) no-wiggle transfer function, n_s = 0.965,
  normalised to sigma_8 = 0.8, in the mock cosmology (flat, H0 = 70, Om = 0.3,
  Ob = 0.048: bagpipes' distances).
* A Gaussian random field on a periodic box that contains the survey cone
  (observer at the origin, cone axis along +z of the box).
* Zel'dovich displacement psi(q); each particle (one per cell) moves by
  D(z(q)) psi(q), so the density is evolved to its own light-cone epoch.
  Eulerian density and velocity come from CIC deposits of the particles.
* T-web (Hahn et al. 2007; Forero-Romero et al. 2009): eigenvalues of the
  tidal tensor d_i d_j phi, nabla^2 phi = delta, of the evolved density
  smoothed with a Gaussian of ``smoothing_mpc``; class = number of
  eigenvalues above ``lambda_th`` (0 Void, 1 Sheet, 2 Filament, 3 Knot).
* Galaxies are drawn cell by cell with rate n(z) (1 + delta)^b and placed
  uniformly inside the cell; redshift-space: z_obs = (1 + z_cos)(1 + v_los/c) - 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .ssp import C_KMS, MOCK_COSMO

H = 0.7
OMEGA_M, OMEGA_B, N_S, SIGMA_8, T_CMB = 0.3, 0.048, 0.965, 0.8, 2.7255


def eh_nowiggle_transfer(k_hmpc: np.ndarray) -> np.ndarray:
    """Eisenstein & Hu (1998) no-wiggle transfer function; k in h/Mpc."""
    k = np.asarray(k_hmpc, dtype=np.float64)
    omh2, obh2, fb = OMEGA_M * H**2, OMEGA_B * H**2, OMEGA_B / OMEGA_M
    theta = T_CMB / 2.7
    s = 44.5 * np.log(9.83 / omh2) / np.sqrt(1.0 + 10.0 * obh2**0.75)  # Mpc
    alpha = 1.0 - 0.328 * np.log(431.0 * omh2) * fb + 0.38 * np.log(22.3 * omh2) * fb**2
    gamma_eff = OMEGA_M * H * (alpha + (1.0 - alpha) / (1.0 + (0.43 * k * H * s) ** 4))
    q = k * theta**2 / gamma_eff
    l0 = np.log(2.0 * np.e + 1.8 * q)
    c0 = 14.2 + 731.0 / (1.0 + 62.5 * q)
    return l0 / (l0 + c0 * q**2)


def _tophat_w(x: np.ndarray) -> np.ndarray:
    return 3.0 * (np.sin(x) - x * np.cos(x)) / x**3


def linear_power(k_mpc: np.ndarray) -> np.ndarray:
    """Linear P(k) at z = 0 in Mpc^3 for k in 1/Mpc, normalised to sigma_8."""
    kk = np.logspace(-4, 2, 4000)  # h/Mpc
    p = kk**N_S * eh_nowiggle_transfer(kk) ** 2
    s8 = np.trapezoid(p * _tophat_w(kk * 8.0) ** 2 * kk**2, kk) / (2 * np.pi**2)
    amp = SIGMA_8**2 / s8
    k_h = np.asarray(k_mpc) / H
    with np.errstate(divide="ignore", invalid="ignore"):
        pk = amp * k_h**N_S * eh_nowiggle_transfer(k_h) ** 2 / H**3
    return np.where(k_h > 0, pk, 0.0)


def growth_factor(z: np.ndarray) -> np.ndarray:
    """Linear growth D(z)/D(0) for flat LCDM (Heath 1977 integral)."""
    a = np.linspace(1e-4, 1.0, 20001)
    e = np.sqrt(OMEGA_M / a**3 + 1.0 - OMEGA_M)
    integ = np.concatenate([[0.0], np.cumsum(0.5 * (1 / (a[1:] * e[1:]) ** 3 + 1 / (a[:-1] * e[:-1]) ** 3) * np.diff(a))])
    d = e * integ
    return np.interp(1.0 / (1.0 + np.asarray(z)), a, d / d[-1])


def growth_rate(z: np.ndarray) -> np.ndarray:
    """f = dlnD/dlna ~ Omega_m(z)^0.55."""
    zz = np.asarray(z)
    om = OMEGA_M * (1 + zz) ** 3 / (OMEGA_M * (1 + zz) ** 3 + 1 - OMEGA_M)
    return om**0.55


@dataclass
class ConeGeometry:
    """Observer at the origin, cone of half-angle ``theta`` around +z, centred on (ra0, dec0) in the sky."""

    area_deg2: float
    zmax: float
    ra0: float = 180.0
    dec0: float = 10.0

    @property
    def theta(self) -> float:
        """Half-opening angle (radians) of a cap of ``area_deg2``."""
        omega = self.area_deg2 * (np.pi / 180.0) ** 2
        return float(np.arccos(1.0 - omega / (2 * np.pi)))

    @property
    def chi_max(self) -> float:
        """Comoving distance (Mpc) to ``zmax``: the cone's depth."""
        return float(MOCK_COSMO.comoving_distance(self.zmax).to_value("Mpc"))

    def to_radec(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RA, DEC (deg) of box positions: box +z maps to (ra0, dec0)."""
        r = pos / np.linalg.norm(pos, axis=1, keepdims=True)
        ra0, dec0 = np.radians(self.ra0), np.radians(self.dec0)
        # Basis: ez -> centre, ex -> east, ey -> north.
        ez = np.array([np.cos(dec0) * np.cos(ra0), np.cos(dec0) * np.sin(ra0), np.sin(dec0)])
        ex = np.array([-np.sin(ra0), np.cos(ra0), 0.0])
        ey = np.cross(ez, ex)
        v = r[:, :1] * ex + r[:, 1:2] * ey + r[:, 2:3] * ez
        ra = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360.0
        dec = np.degrees(np.arcsin(np.clip(v[:, 2], -1, 1)))
        return ra, dec


@dataclass
class CosmicWeb:
    """The evolved light-cone field on a grid and what the galaxies need from it."""

    origin: np.ndarray  # (3,) Mpc, position of cell (0,0,0)'s corner
    cell: float  # Mpc
    shape: tuple[int, int, int]
    delta_bias: np.ndarray  # evolved density contrast, smoothed by one cell (for sampling)
    delta_truth: np.ndarray  # evolved density contrast smoothed with ``smoothing_mpc``
    web: np.ndarray  # int8 T-web class per cell
    velocity: np.ndarray  # (3, nx, ny, nz) float32 Eulerian peculiar velocity, km/s
    smoothing_mpc: float
    lambda_th: float


def _kgrid(shape: tuple[int, int, int], cell: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kx = 2 * np.pi * np.fft.fftfreq(shape[0], cell)
    ky = 2 * np.pi * np.fft.fftfreq(shape[1], cell)
    kz = 2 * np.pi * np.fft.rfftfreq(shape[2], cell)
    return kx[:, None, None], ky[None, :, None], kz[None, None, :]


def _cic_deposit(pos: np.ndarray, weights: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray:
    """Cloud-in-cell deposit of positions given in cell units (periodic)."""
    i0 = np.floor(pos - 0.5).astype(np.int64)
    f = (pos - 0.5 - i0).astype(np.float32)
    out = np.zeros(int(np.prod(shape)), dtype=np.float64)
    w = np.ones(pos.shape[0], dtype=np.float32) if weights is None else weights.astype(np.float32)
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1 - f[:, 0]
        ix = (i0[:, 0] + dx) % shape[0]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1 - f[:, 1]
            iy = (i0[:, 1] + dy) % shape[1]
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1 - f[:, 2]
                iz = (i0[:, 2] + dz) % shape[2]
                flat = (ix * shape[1] + iy) * shape[2] + iz
                out += np.bincount(flat, weights=w * wx * wy * wz, minlength=out.size)
    return out.reshape(shape)


def tweb_classify(delta: np.ndarray, cell: float, lambda_th: float) -> np.ndarray:
    """T-web class (number of tidal eigenvalues above ``lambda_th``) of a (smoothed) density grid."""
    kx, ky, kz = _kgrid(delta.shape, cell)
    k2 = kx**2 + ky**2 + kz**2
    k2[0, 0, 0] = 1.0
    dk = np.fft.rfftn(delta)
    comps = {}
    for name, (a, b) in {"xx": (kx, kx), "yy": (ky, ky), "zz": (kz, kz), "xy": (kx, ky), "xz": (kx, kz), "yz": (ky, kz)}.items():
        comps[name] = np.fft.irfftn(dk * (a * b / k2), s=delta.shape).astype(np.float32)
    t = np.empty(delta.shape + (3, 3), dtype=np.float32)
    t[..., 0, 0], t[..., 1, 1], t[..., 2, 2] = comps["xx"], comps["yy"], comps["zz"]
    t[..., 0, 1] = t[..., 1, 0] = comps["xy"]
    t[..., 0, 2] = t[..., 2, 0] = comps["xz"]
    t[..., 1, 2] = t[..., 2, 1] = comps["yz"]
    del comps
    eig = np.linalg.eigvalsh(t.reshape(-1, 3, 3))
    return (eig > lambda_th).sum(axis=1).astype(np.int8).reshape(delta.shape)


def _gaussian_smooth(field: np.ndarray, cell: float, radius: float) -> np.ndarray:
    kx, ky, kz = _kgrid(field.shape, cell)
    k2 = kx**2 + ky**2 + kz**2
    return np.fft.irfftn(np.fft.rfftn(field) * np.exp(-0.5 * k2 * radius**2), s=field.shape).astype(np.float32)


def build_cosmic_web(
    geom: ConeGeometry, rng: np.random.Generator, max_cells: int = 2**23, min_cell: float = 3.0,
    smoothing_mpc: float = 4.0, lambda_th: float = 0.2,
) -> CosmicWeb:
    """Generate the evolved light-cone density, velocity and T-web for a survey cone."""
    chi = geom.chi_max
    half = chi * np.sin(min(geom.theta, np.pi / 2)) + 20.0
    depth = chi + 20.0
    cell = min_cell
    while (2 * half / cell) ** 2 * (depth / cell) > max_cells:
        cell *= 1.05
    nxy = int(np.ceil(2 * half / cell))
    nz = int(np.ceil(depth / cell))
    nxy += nxy % 2
    nz += nz % 2
    shape = (nxy, nxy, nz)
    origin = np.array([-nxy * cell / 2, -nxy * cell / 2, -10.0])
    kx, ky, kz = _kgrid(shape, cell)
    k2 = kx**2 + ky**2 + kz**2
    white = rng.standard_normal(shape, dtype=np.float32)
    dk = np.fft.rfftn(white) * np.sqrt(linear_power(np.sqrt(k2)) / cell**3)
    del white
    k2[0, 0, 0] = 1.0
    # Lagrangian grid and the growth at each particle's own distance (light cone).
    q = (np.indices(shape, dtype=np.float32).reshape(3, -1).T + 0.5)  # cell units
    qpos = origin + q * cell
    dist = np.linalg.norm(qpos, axis=1)
    zz = np.linspace(0.0, geom.zmax * 1.5 + 0.1, 2000)
    z_of_chi = np.interp(dist, MOCK_COSMO.comoving_distance(zz).to_value("Mpc"), zz)
    d_of = growth_factor(z_of_chi).astype(np.float32)
    # Velocity factor a H f D (km/s per Mpc of displacement).
    vfac = (MOCK_COSMO.H(z_of_chi).to_value("km/(s Mpc)") / (1 + z_of_chi) * growth_rate(z_of_chi)).astype(np.float32) * d_of
    disp = np.empty_like(q)
    for i, ki in enumerate((kx, ky, kz)):
        disp[:, i] = np.fft.irfftn(1j * ki / k2 * dk, s=shape).astype(np.float32).ravel()
    del dk
    xpos = q + disp * d_of[:, None] / cell
    mass = _cic_deposit(xpos, None, shape)
    vel = np.stack([_cic_deposit(xpos, disp[:, i] * vfac, shape) for i in range(3)])
    del xpos, disp, q, qpos
    with np.errstate(invalid="ignore", divide="ignore"):
        vel = np.where(mass > 1e-3, vel / mass, 0.0).astype(np.float32)
    delta = (mass / mass.mean() - 1.0).astype(np.float32)
    delta_bias = np.clip(_gaussian_smooth(delta, cell, cell), -0.99, None)
    delta_truth = _gaussian_smooth(delta, cell, smoothing_mpc)
    web = tweb_classify(delta_truth, cell, lambda_th)
    return CosmicWeb(origin, cell, shape, delta_bias, delta_truth, web, vel, smoothing_mpc, lambda_th)


def cone_cells(web: CosmicWeb, geom: ConeGeometry, zmin: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and redshifts of cells whose centres lie inside the cone and zmin < z < zmax."""
    idx = np.indices(web.shape, dtype=np.float32).reshape(3, -1).T
    pos = web.origin + (idx + 0.5) * web.cell
    del idx
    dist = np.linalg.norm(pos, axis=1)
    cos_t = pos[:, 2] / np.maximum(dist, 1e-6)
    zz = np.linspace(0.0, geom.zmax * 1.5 + 0.1, 2000)
    z = np.interp(dist, MOCK_COSMO.comoving_distance(zz).to_value("Mpc"), zz)
    inside = (cos_t >= np.cos(geom.theta)) & (z > zmin) & (z < geom.zmax)
    flat = np.flatnonzero(inside)
    return flat, z[flat]


def truth_skeleton(
    web: CosmicWeb, geom: ConeGeometry, nbar: Callable[[np.ndarray], np.ndarray], bias: float = 1.3, nsigma: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Filament skeleton of the true field in the cone: the truth for ``Dist_Filament``.

    The layer's own skeleton code (``ard_sql.science.skeleton``) on ``1 + bias x delta_truth``
    (real space, no sampling noise; cells outside the cone masked), with the persistence cut
    in units of the Poisson noise the galaxies' density ``nbar(r)`` (Mpc^-3) gives a cell of
    the layer (``cosmicweb.skeleton_noise``), so that the same ``nsigma`` keeps filaments of
    about the same significance. Approximately: the mock draws its galaxies from
    ``(1 + delta)^b`` (b 1.3 bright, 2 dark), which moves no ridge but changes the contrasts.
    Returns the segments' end points ``(m, 3)``, ``(m, 3)`` in the box frame (Mpc).
    """
    from ard_sql.science.cosmicweb import skeleton_noise
    from ard_sql.science.skeleton import filament_skeleton

    flat, _ = cone_cells(web, geom)
    inside = np.zeros(int(np.prod(web.shape)), bool)
    inside[flat] = True
    inside = inside.reshape(web.shape)
    field = np.where(inside, np.maximum(1.0 + bias * web.delta_truth, 0.0), np.nan).astype(np.float32)

    def centre(cells: np.ndarray) -> np.ndarray:
        return web.origin + (np.stack(np.unravel_index(cells, web.shape), axis=-1) + 0.5) * web.cell

    expected = np.zeros(web.shape)  # masked cells (outside the cone) take no part in the skeleton
    expected.flat[flat] = nbar(np.linalg.norm(centre(flat), axis=1)) * web.cell**3
    sigma = skeleton_noise(np.nan_to_num(field, nan=1.0), expected, web.cell, web.smoothing_mpc)
    sk = filament_skeleton(field, sigma, nsigma)
    return centre(sk.start), centre(sk.end)


def observed_redshift(z_cosmo: np.ndarray, v_los_kms: np.ndarray) -> np.ndarray:
    """Redshift seen for a cosmological redshift and a line-of-sight peculiar velocity (km/s):
    (1 + z_obs) = (1 + z_cosmo)(1 + v/c)."""
    return (1.0 + np.asarray(z_cosmo)) * (1.0 + np.asarray(v_los_kms) / C_KMS) - 1.0


def sample_galaxies(
    web: CosmicWeb, geom: ConeGeometry, nbar_of_z: Callable[[np.ndarray], np.ndarray], bias: float, n: int, rng: np.random.Generator,
    sigma_v_kms: float = 150.0,
) -> dict[str, np.ndarray]:
    """Draw exactly ``n`` galaxies with rate nbar(z) (1 + delta)^bias inside the cone.

    Returns RA, DEC, Z_COSMO, Z_OBS, comoving X/Y/Z (Mpc, box frame), DELTA (truth smoothing),
    WEB_CLASS, V_LOS (km/s) and V_LOS_FLOW (km/s, its coherent Zel'dovich part; the rest is the
    random motion inside structures).
    """
    flat, zc = cone_cells(web, geom)
    rate = nbar_of_z(zc) * (1.0 + web.delta_bias.ravel()[flat]) ** bias
    cdf = np.cumsum(rate)
    cdf /= cdf[-1]
    out: dict[str, list[np.ndarray]] = {}
    have = 0
    zz = np.linspace(0.0, geom.zmax * 1.5 + 0.1, 2000)
    chi_tab = MOCK_COSMO.comoving_distance(zz).to_value("Mpc")
    while have < n:
        m = int((n - have) * 1.3) + 16
        pick = flat[np.minimum(np.searchsorted(cdf, rng.random(m)), flat.size - 1)]
        ijk = np.stack(np.unravel_index(pick, web.shape), axis=1)
        pos = web.origin + (ijk + rng.random((m, 3))) * web.cell
        dist = np.linalg.norm(pos, axis=1)
        z = np.interp(dist, chi_tab, zz)
        keep = (pos[:, 2] / dist >= np.cos(geom.theta)) & (z > 0.01) & (z < geom.zmax)
        pos, z, pick, dist = pos[keep], z[keep], pick[keep], dist[keep]
        rhat = pos / dist[:, None]
        v = web.velocity.reshape(3, -1)[:, pick].T
        dens = web.delta_truth.ravel()[pick]
        # Random motions inside structures grow with density (fingers of God).
        sig = sigma_v_kms * np.sqrt(np.clip(1.0 + dens, 0.2, 20.0))
        vflow = (v * rhat).sum(axis=1)
        vlos = vflow + sig * rng.standard_normal(z.size)
        zobs = observed_redshift(z, vlos)
        ra, dec = geom.to_radec(pos)
        for key, val in (("RA", ra), ("DEC", dec), ("Z_COSMO", z), ("Z_OBS", zobs), ("X", pos[:, 0]), ("Y", pos[:, 1]),
                         ("Z_COMOVING", pos[:, 2]), ("DELTA", dens), ("WEB_CLASS", web.web.ravel()[pick]), ("V_LOS", vlos),
                         ("V_LOS_FLOW", vflow)):
            out.setdefault(key, []).append(val)
        have += z.size
    return {k: np.concatenate(v)[:n] for k, v in out.items()}
