"""ard_sql: the DESI galaxy-spectra archive as an Analysis Ready Dataset.

    import ard_sql
    db = ard_sql.open()              # $ARD_HOME or the per-user data folder; read-only
    db.sql("SELECT TargetID, Z, SNR_Median FROM ard WHERE Z > 0.5").df()
    db.sql("SELECT spectrum(TargetID).flux FROM ard LIMIT 3")
"""

from __future__ import annotations

from ard_sql.connection import ARD, ARDNotFound, open

__all__ = ["ARD", "ARDNotFound", "open"]
