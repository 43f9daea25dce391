"""Build layer ``lick``: Dn4000, D4000 and Lick indices (with errors) for one partition.

The science lives in :mod:`ard_sql.science.lick`; this layer feeds it the
partition's spectra (brz grid, vacuum) and redshifts, and returns the staging
table of :data:`ard_sql.contract.LICK_COLUMNS`, one row per core row. A
spectrum that cannot be measured gets NULL indices and ``Lick_flag`` bits.

Options (``BuildOptions.layer_options["lick"]``):
``max_bad_frac`` (a fraction in [0, 1], default 0.25): largest bad-pixel fraction of a band.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ard_sql.build.layers.base import Partition, fraction, parse_options
from ard_sql.science import lick

_OPTIONS = {"max_bad_frac": fraction}


def options(raw: dict[str, Any]) -> dict[str, Any]:
    """The layer's options, types converted; an unknown name is a ValueError."""
    return parse_options("lick", raw, _OPTIONS)


class LickLayer:
    """Per-partition layer measuring the indices of :data:`ard_sql.science.lick.INDICES`."""

    name = "lick"
    version = "1"
    check_options = staticmethod(options)

    def run(self, part: Partition) -> pa.Table:
        """Return TargetID + the lick columns for every core row of ``part``."""
        opts = options(part.options)
        targetid = part.core.column("TargetID").to_numpy()
        if len(targetid) == 0:
            return lick.lick_arrow_schema().empty_table()
        z = part.core.column("Z").to_numpy(zero_copy_only=False).astype(np.float64)  # NULL Z -> NaN
        spec = part.spectra()
        if not np.array_equal(spec.targetid, targetid):
            raise ValueError(
                f"lick layer, pixel {part.pixel}: spectra rows do not match the core rows "
                f"(first core TargetID {targetid[0]}, first spectrum {spec.targetid[0] if len(spec.targetid) else None})"
            )
        result = lick.measure_indices(spec.wave, spec.flux, spec.ivar, z, spec.mask, **opts)
        return lick.to_arrow(targetid, result)
