"""`ard demo` end to end on a small mock: every layer, the workflow, its plots (slow: minutes)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ard_sql.cli import app


@pytest.mark.slow
def test_demo_builds_every_layer_and_runs_the_workflow(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--n", "400", "--area", "10", "--zmax", "0.3", "--no-progress"])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "demo-result.json").read_text())
    assert result["neighbours"] == 50
    # 400 targets are far too sparse for a T-web: the demo says so (Web_Class NULL, bit SPARSE)
    assert result["sparse_fraction"] > 0.9
    assert all((out / "plots" / name).exists() for name in ("neighbours.png", "quenching_diagram.png", "bpt.png"))
    report = json.loads((out / "build-report.json").read_text())
    assert {"core", "lick", "ppxf", "bagpipes", "embed", "topology", "wide"} <= set(report["layers"])
