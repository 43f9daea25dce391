"""Options of ``ard build``: one dataclass, a docstring per field, typos rejected.

``BuildOptions.from_dict`` (used for config files and ``--set``) refuses an
unknown key with "did you mean ...?", as LSDB's loading config does.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ard_sql.build.ingest.targets import DEFAULT_MAX_ROWS, MAX_ORDER


#: Schedulers started here; anything else must be the address of a running dask scheduler.
LOCAL_SCHEDULERS = ("processes", "threads", "sync")
#: A dask scheduler address: optional protocol, host, port (``tcp://10.0.0.1:8786``, ``localhost:8786``).
_SCHEDULER_ADDRESS = re.compile(r"^([a-z][a-z0-9+]*://)?[^\s:/]+:\d+/?$")


class OptionError(ValueError):
    """An unknown or invalid build option."""


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(choices))}"


@dataclass
class BuildOptions:
    """Everything that controls one run of ``ard build``."""

    out: str
    """ARD folder to create or update."""
    source: str | None = None
    """Folder of DESI coadd/redrock files (searched recursively). None: keep the existing core and run layers only."""
    layers: list[str] | None = None
    """Layers to run after the ingest; None = every available layer; [] = the core only."""
    workers: int | None = None
    """Number of local worker processes (default: CPU count)."""
    scheduler: str | None = None
    """'processes' (default: a local dask.distributed cluster), 'threads', 'sync' (in-process, for
    debugging), or the address of a running dask scheduler (e.g. 'tcp://10.0.0.1:8786')."""
    keep_going: bool = False
    """Exit with status 0 even when something was skipped (the report still lists it)."""
    order: int | None = None
    """HEALPix order of the partitions (0-6); default: the existing ARD's, else chosen from the target counts."""
    max_rows: int = DEFAULT_MAX_ROWS
    """Target partition size used to choose the order automatically."""
    zcat: str | None = None
    """zpix/zall catalog whose ZCAT_PRIMARY picks the primary spectrum of targets observed more than once."""
    force: bool = False
    """Rebuild every partition, even those whose inputs did not change."""
    progress: bool = True
    """Show progress bars."""
    layer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-layer options, e.g. {'ppxf': {'mode': 'fast'}}; handed to the layer as ``Partition.options``."""

    def __post_init__(self) -> None:
        if self.order is not None and not 0 <= int(self.order) <= MAX_ORDER:
            raise OptionError(f"order must be between 0 and {MAX_ORDER} (DESI healpix coadds are order 6), got {self.order}")
        if self.workers is not None and int(self.workers) < 1:
            raise OptionError(f"workers must be at least 1, got {self.workers}")
        if self.scheduler not in (None, *LOCAL_SCHEDULERS) and not _SCHEDULER_ADDRESS.match(self.scheduler):
            raise OptionError(f"scheduler must be {', '.join(map(repr, LOCAL_SCHEDULERS))} or a dask scheduler address "
                              f"such as 'tcp://10.0.0.1:8786', got {self.scheduler!r}")
        if self.max_rows < 1:
            raise OptionError(f"max_rows must be at least 1, got {self.max_rows}")
        if self.layers is not None:
            from ard_sql.build.layers import LAYERS

            wanted = [name for name in self.layers if name != "core"]
            for name in wanted:
                if name not in LAYERS:
                    raise OptionError(f"unknown layer {name!r}" + _suggest(name, ["core", *LAYERS]))
            self.layers = wanted
        from ard_sql.build.layers import LAYERS

        for name in self.layer_options:
            if name not in LAYERS:
                raise OptionError(f"layer_options: unknown layer {name!r}" + _suggest(name, list(LAYERS)))

    @property
    def n_workers(self) -> int:
        """Workers to start locally."""
        return int(self.workers or os.cpu_count() or 1)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BuildOptions":
        """Build options from a mapping, rejecting unknown keys with a suggestion."""
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                raise OptionError(f"unknown build option {key!r}" + _suggest(key, names))
        return cls(**values)

    def set(self, assignment: str) -> None:
        """Apply one ``layer.key=value`` assignment (value parsed as JSON when it can be)."""
        import json

        key, sep, raw = assignment.partition("=")
        layer, dot, option = key.strip().partition(".")
        if not sep or not dot or not layer or not option:
            raise OptionError(f"--set expects layer.key=value, got {assignment!r}")
        from ard_sql.build.layers import LAYERS

        if layer not in LAYERS:
            raise OptionError(f"--set {assignment!r}: unknown layer {layer!r}" + _suggest(layer, list(LAYERS)))
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        self.layer_options.setdefault(layer, {})[option] = value

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``ard_meta`` and the report)."""
        return asdict(self)
