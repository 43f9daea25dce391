"""Registry of build layers: name -> ``"module:Class"``, imported lazily.

A layer engineer adds ONE line to ``LAYERS``. A layer whose module is not
importable (not written yet, or a missing optional dependency) is reported as
"not available" with the reason, and ``ard build`` without ``--layers`` runs
every layer that is available.

``core`` is not in this registry: it is the ingest step, always run first by
the orchestrator.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

#: Layer name -> "module:Class". Order is the build order (topology, a global
#: layer, comes last because it needs every position).
LAYERS: dict[str, str] = {
    "lick": "ard_sql.build.layers.lick:LickLayer",
    "ppxf": "ard_sql.build.layers.ppxf:PpxfLayer",
    "bagpipes": "ard_sql.build.layers.bagpipes:BagpipesLayer",
    "embed": "ard_sql.build.layers.embed:EmbedLayer",
    "topology": "ard_sql.build.layers.topology:TopologyLayer",
}


class LayerNotAvailable(RuntimeError):
    """A registered layer whose module or class cannot be imported."""


@dataclass(frozen=True)
class LayerStatus:
    """Whether one registered layer can run, and why not."""

    name: str
    target: str
    available: bool
    reason: str = ""


def _split(target: str) -> tuple[str, str]:
    module, _, cls = target.partition(":")
    if not module or not cls:
        raise ValueError(f"layer target {target!r} must be 'module:Class'")
    return module, cls


def load_layer_class(name: str) -> type:
    """Import and return the class registered for layer ``name``.

    Raises ``KeyError`` for an unknown name and ``LayerNotAvailable`` (with
    the import error) when its module or class is missing.
    """
    if name not in LAYERS:
        raise KeyError(f"unknown layer {name!r}; registered layers: {', '.join(LAYERS)}")
    module_name, cls_name = _split(LAYERS[name])
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LayerNotAvailable(f"layer {name!r} is not available: cannot import {module_name} ({exc})") from exc
    try:
        return getattr(module, cls_name)
    except AttributeError:
        raise LayerNotAvailable(f"layer {name!r} is not available: {module_name} has no class {cls_name}") from None


def make_layer(name: str, **kwargs: Any) -> Any:
    """Instantiate layer ``name`` (its class called with ``kwargs``)."""
    return load_layer_class(name)(**kwargs)


def layer_status(name: str) -> LayerStatus:
    """Availability of one registered layer (never raises for a missing module)."""
    try:
        load_layer_class(name)
    except LayerNotAvailable as exc:
        return LayerStatus(name, LAYERS[name], False, str(exc))
    return LayerStatus(name, LAYERS[name], True)


def available_layers() -> list[str]:
    """Names of the registered layers that import cleanly, in build order."""
    return [name for name in LAYERS if layer_status(name).available]


def all_layer_status() -> list[LayerStatus]:
    """Status of every registered layer, in build order."""
    return [layer_status(name) for name in LAYERS]
