"""ard_sql: the DESI galaxy-spectra archive as an Analysis Ready Dataset.

    import ard_sql
    db = ard_sql.open()              # $ARD_HOME or the per-user data folder; read-only
    db.sql("SELECT TargetID, Z, SNR_Median FROM ard WHERE Z > 0.5").df()
    db.sql("SELECT spectrum(TargetID).flux FROM ard LIMIT 3")
"""

from __future__ import annotations

from ard_sql.connection import ARD, ARDNotFound, open

__all__ = ["ARD", "ARDNotFound", "open", "plot_spectrum", "plot_quenching_diagram", "plot_bpt", "plot_sky"]

_PLOTS = {"plot_spectrum", "plot_quenching_diagram", "plot_bpt", "plot_sky"}


def __getattr__(name: str):
    # Plotting imports matplotlib: only when a plot is asked for.
    if name in _PLOTS:
        from ard_sql import plotting

        return getattr(plotting, name)
    raise AttributeError(f"module 'ard_sql' has no attribute {name!r}")
