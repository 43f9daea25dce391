"""Problems met during a build, and the ``build-report.json`` that lists them.

A problem names what it is about as precisely as it can (layer, partition
pixel, file, target) and why. Errors mean something was skipped (a file, a
target, a partition); warnings mean the data was kept with a repair (e.g.
NaN pixels masked).

``ard build`` exits non-zero on every error and on every problem with an
input file, repaired or not (NaN flux, negative ivar, a duplicate row): the
data is kept repaired, but a pipeline that reads the exit code hears that its
input was bad. ``--keep-going`` accepts both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ard_sql import paths


@dataclass
class Problem:
    """One thing a build skipped or repaired, and why."""

    reason: str
    layer: str = "core"
    file: str | None = None
    target: int | None = None
    pixel: int | None = None
    order: int | None = None
    severity: str = "error"
    """'error' (something was skipped) or 'warning' (kept, repaired)."""

    def __str__(self) -> str:
        where = [f"layer {self.layer}"]
        if self.pixel is not None:
            where.append(f"pixel {self.pixel}" + (f" (order {self.order})" if self.order is not None else ""))
        if self.file:
            where.append(f"file {self.file}")
        if self.target is not None:
            where.append(f"target {self.target}")
        return f"{self.severity}: {', '.join(where)}: {self.reason}"


#: TargetIDs a report entry lists before it gives only the count of the rest.
MAX_LISTED_TARGETS = 20


def targetid_list(targetids: np.ndarray) -> str:
    """'TargetID a, b, ...' of the sorted ids: the first MAX_LISTED_TARGETS, then a count of the rest."""
    tids = [int(t) for t in np.sort(np.asarray(targetids, dtype=np.int64))]
    listed = ", ".join(str(t) for t in tids[:MAX_LISTED_TARGETS])
    more = f" and {len(tids) - MAX_LISTED_TARGETS} more" if len(tids) > MAX_LISTED_TARGETS else ""
    return f"TargetID {listed}{more}"


class BadInput(Exception):
    """A source file (or target) that cannot be ingested; the message names it and why."""

    def __init__(self, reason: str, file: str | Path | None = None, target: int | None = None) -> None:
        self.reason = reason
        self.file = str(file) if file is not None else None
        self.target = target
        super().__init__(str(self.problem()))

    def problem(self, layer: str = "core") -> Problem:
        """This error as a report entry."""
        return Problem(self.reason, layer=layer, file=self.file, target=self.target)


@dataclass
class BuildReport:
    """What ``build-report.json`` holds."""

    started: str = ""
    finished: str = ""
    source: str = ""
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        """The problems that skipped something."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def repaired_inputs(self) -> list[Problem]:
        """The warnings about an input file (kept repaired); with :attr:`errors`, what makes the build exit 1."""
        return [p for p in self.problems if p.severity != "error" and p.file is not None]

    def add(self, problems: Iterable[Problem]) -> None:
        """Append problems."""
        self.problems.extend(problems)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "started": self.started,
            "finished": self.finished,
            "source": self.source,
            "layers": self.layers,
            "n_errors": len(self.errors),
            "n_warnings": len(self.problems) - len(self.errors),
            "problems": [{k: v for k, v in asdict(p).items() if v is not None} | {"message": str(p)} for p in self.problems],
        }

    def write(self, ard_dir: Path | str) -> Path:
        """Write ``build-report.json`` atomically."""
        return paths.atomic_write_text(paths.report_path(ard_dir), json.dumps(self.to_dict(), indent=2, default=str))
