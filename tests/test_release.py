"""Steam-style releases (issue 9): ``ard publish`` and ``ard pull``.

A catalog-only ARD (synth_catalog, order 1) is published once; each test
copies the release folder, serves it from a standard-library HTTP server on
127.0.0.1 (port 0, with Range support and fault injection) where it needs
HTTP, and checks a pull, a region/layer subset, an update that moves only the
changed partition, a damaged file (rejected, nothing lost), interrupted
transfers (resumed with Range, within a pull and across pulls) and a crash
in the middle of the switch (rolled forward by the next pull).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
import urllib.parse
from pathlib import Path

import duckdb
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import ard_sql
from ard_sql import contract, paths, regions, release
from ard_sql.build import hats_writer
from ard_sql.build.synth_catalog import SynthOptions, synth_catalog
from ard_sql.cli import app

N = 300
REGION = "CIRCLE 180 30 25"


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def source_ard(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("release_src") / "ard"
    synth_catalog(d, SynthOptions(n=N, order=1, layers=("lick", "topology")))
    return d


@pytest.fixture(scope="module")
def release_v1_master(source_ard, tmp_path_factory) -> Path:
    rel = tmp_path_factory.mktemp("release_master") / "releases"
    release.publish(source_ard, rel)
    return rel


@pytest.fixture
def release_dir(release_v1_master, tmp_path) -> Path:
    """A private copy of the release folder holding version 1."""
    d = tmp_path / "releases"
    shutil.copytree(release_v1_master, d)
    return d


class _Handler(http.server.BaseHTTPRequestHandler):
    """Static files with ``Range: bytes=N-`` and a fault: cut a response after some bytes."""

    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        rng = self.headers.get("Range")
        with srv.mutex:
            srv.log.append((rel, rng))
        f = (srv.root / rel).resolve()
        if not f.is_file() or srv.root not in f.parents:
            self.send_error(404)
            return
        data = f.read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and int(m.group(1)) < len(data):
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with srv.mutex:
            cut = srv.cuts.get(rel)
            if cut and cut["times"] > 0:
                cut["times"] -= 1
                body = body[: cut["bytes"]]
                self.close_connection = True
        self.wfile.write(body)
        self.wfile.flush()


@pytest.fixture
def serve():
    """serve(folder) -> server with .url, .log [(path, Range)], .cuts {path: {bytes, times}}; stopped after the test."""
    servers = []

    def start(root: Path):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.daemon_threads = True
        srv.root, srv.log, srv.cuts, srv.mutex = Path(root).resolve(), [], {}, threading.Lock()
        srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _manifest(release_dir: Path, version: str) -> dict:
    return json.loads(paths.release_manifest(release_dir, version).read_text())


def _partition_rel(layer: str, order: int, pixel: int) -> str:
    return (Path("staging") / layer / "dataset" / paths.pixel_relpath(order, pixel)).as_posix()


def _publish_v2(source_ard: Path, release_dir: Path, tmp_path: Path) -> dict:
    """Version 2: one lick partition changed (Dn4000 + 1), one topology partition gone."""
    src2 = tmp_path / "src2"
    shutil.copytree(source_ard, src2)
    files = hats_writer.partition_files(src2, "lick")
    order, pixel, f = files[0]
    t = pq.read_table(f)
    t = t.set_column(t.schema.get_field_index("Dn4000"), "Dn4000", pc.add(t["Dn4000"], 1.0))
    hats_writer.write_partition(src2, "lick", order, pixel, t)
    gone = hats_writer.partition_files(src2, "topology")[-1]
    gone_rows = pq.read_metadata(gone[2]).num_rows
    gone[2].unlink()
    m = release.publish(src2, release_dir)
    m["_changed"] = _partition_rel("lick", order, pixel)
    m["_changed_pixel"] = pixel
    m["_gone"] = _partition_rel("topology", gone[0], gone[1])
    m["_gone_rows"] = gone_rows
    return m


def _snapshot(ard_dir: Path) -> dict[str, str]:
    """sha256 of every file of an ARD folder outside ``.pull/``."""
    out = {}
    for f in sorted(ard_dir.rglob("*")):
        rel = f.relative_to(ard_dir)
        if f.is_file() and rel.parts[0] != paths.PULL_DIRNAME:
            out[rel.as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _pulled_then_v2(source_ard: Path, release_dir: Path, srv, tmp_path: Path) -> tuple[Path, dict[str, str], dict]:
    """A copy pulled at version 1 (its folder and file snapshot), then version 2 published."""
    out = tmp_path / "mine"
    release.pull(srv.url, out)
    return out, _snapshot(out), _publish_v2(source_ard, release_dir, tmp_path)


def _count(ard_dir: Path, sql: str = "SELECT count(*) FROM ard"):
    with ard_sql.open(ard_dir) as db:
        return db.sql(sql).fetchall()[0]


# ----------------------------------------------------------------- publish
def test_publish_writes_versioned_checksummed_manifest(source_ard, release_dir):
    m = _manifest(release_dir, "1")
    assert m["format"] == release.FORMAT and m["version"] == "1" and m["previous"] is None
    latest = json.loads(paths.release_latest(release_dir).read_text())
    assert latest["version"] == "1"
    assert latest["manifests"]["1"] == hashlib.sha256(paths.release_manifest(release_dir, "1").read_bytes()).hexdigest()
    for e in m["files"]:
        f = release_dir / "1" / e["path"]
        assert f.stat().st_size == e["size"] and release.sha256_file(f) == e["sha256"]
        assert e["sha256"] == release.sha256_file(source_ard / e["path"])
    names = {e["path"] for e in m["files"]}
    assert not any(n.endswith(("ard.duckdb", "_metadata", "partition_info.csv", "_schema.parquet")) for n in names)
    core = [e for e in m["files"] if e["layer"] == "core" and e["kind"] == "partition"]
    assert core and all(e["order"] == 1 and isinstance(e["pixel"], int) for e in core)
    assert sum(e["rows"] for e in core) == N == m["layers"]["core"]["rows"]
    assert [c["name"] for c in m["layers"]["lick"]["columns"]] == [c.name for c in contract.columns("lick")]
    assert {"core", "lick", "topology"} <= set(m["layers"])

    # an unchanged republish costs nothing: every file is a hard link to version 1
    m2 = release.publish(source_ard, release_dir)
    assert m2["version"] == "2" and m2["previous"] == "1"
    assert m2["hard_linked_from_previous"] == len(m2["files"]) == len(m["files"])
    e = m2["files"][0]
    assert (release_dir / "2" / e["path"]).stat().st_ino == (release_dir / "1" / e["path"]).stat().st_ino
    with pytest.raises(release.ReleaseError, match="already exists"):
        release.publish(source_ard, release_dir, version="2")


# ----------------------------------------------------------------- pull + update over HTTP
def test_pull_over_http_then_update_moves_only_changed_partitions(source_ard, release_dir, serve, tmp_path, monkeypatch):
    srv = serve(release_dir)
    out = tmp_path / "mine"
    res = release.pull(srv.url, out, progress=None)
    assert res.version == "1" and res.previous_version is None
    assert len(res.fetched) == len(_manifest(release_dir, "1")["files"])
    assert _count(out) == (N,)
    with ard_sql.open(source_ard) as db:
        want = db.sql("SELECT sum(Dn4000), count(Web_Class) FROM ard").fetchall()[0]
    assert _count(out, "SELECT sum(Dn4000), count(Web_Class) FROM ard") == pytest.approx(want)
    # plain DuckDB, another working directory, no ard_sql session variable
    monkeypatch.chdir(tmp_path)
    con = duckdb.connect(str(out / "ard.duckdb"), read_only=True)
    assert con.sql("SELECT count(*), count(Dn4000) FROM ard").fetchall() == [(N, N)]
    assert con.sql("SELECT value FROM ard_meta WHERE name = 'release_version'").fetchall() == [("1",)]
    con.close()
    assert (paths.staging_dir(out, "core") / "partition_info.csv").exists()
    assert (paths.staging_dir(out, "lick") / "dataset" / "_metadata").exists()

    v2 = _publish_v2(source_ard, release_dir, tmp_path)
    srv.log.clear()
    res = release.pull(srv.url, out)
    assert res.version == "2" and res.previous_version == "1"
    assert res.fetched == [v2["_changed"]]
    assert res.removed == [v2["_gone"]]
    assert res.kept == len(v2["files"]) - 1
    got = sorted(p for p, _ in srv.log)
    assert got == sorted(["latest.json", "2/manifest.json", "2/" + v2["_changed"]])
    assert not (out / v2["_gone"]).exists()
    assert _count(out, "SELECT count(Web_Class) FROM ard") == (N - v2["_gone_rows"],)
    new = _count(out, f"SELECT sum(Dn4000) FROM ard WHERE Npix = {v2['_changed_pixel']}")[0]
    old = _count(source_ard, f"SELECT sum(Dn4000), count(*) FROM ard WHERE Npix = {v2['_changed_pixel']}")
    assert new == pytest.approx(old[0] + old[1])
    assert json.loads(paths.release_file(out).read_text())["version"] == "2"
    assert not list(paths.pull_dir(out).glob("2"))  # staging area cleaned


def test_pull_layers_and_region_from_a_folder(source_ard, release_dir, tmp_path):
    out = tmp_path / "sub"
    res = release.pull(release_dir, out, layers=["lick"], region=REGION)
    assert res.layers == ["core", "lick"] and res.region == REGION
    region = regions.parse_region(REGION)
    want = {f.relative_to(source_ard).as_posix() for f in regions.partition_files(source_ard, "core", region)}
    have = {f.relative_to(out).as_posix() for _, _, f in hats_writer.partition_files(out, "core")}
    assert have == want and 0 < len(have) < len(hats_writer.partition_files(source_ard, "core"))
    assert len(hats_writer.partition_files(out, "lick")) == len(have)
    assert not hats_writer.partition_files(out, "topology")
    assert not (out / "artifacts" / "synth").exists()
    rows = sum(e["rows"] for e in _manifest(release_dir, "1")["files"] if e["path"] in want)
    assert _count(out, "SELECT count(*), count(Dn4000), count(Web_Class) FROM ard") == (rows, rows, 0)
    assert _count(out, "SELECT count(*) FROM topology") == (0,)

    # a later pull keeps the selection; widening it fetches only what is missing
    again = release.pull(release_dir, out)
    assert again.fetched == [] and again.layers == ["core", "lick"]
    wide = release.pull(release_dir, out, layers=["all"], region="all")
    assert wide.kept == 2 * len(have) and len(wide.fetched) == len(_manifest(release_dir, "1")["files"]) - 2 * len(have)
    assert _count(out, "SELECT count(*), count(Web_Class) FROM ard") == (N, N)
    with pytest.raises(release.ReleaseError, match="no layer ppxf"):
        release.pull(release_dir, out, layers=["ppxf"])


# ----------------------------------------------------------------- damage and interruptions
def test_corrupted_file_is_rejected_and_nothing_is_lost(source_ard, release_dir, serve, tmp_path):
    srv = serve(release_dir)
    out, before, v2 = _pulled_then_v2(source_ard, release_dir, srv, tmp_path)
    bad = release_dir / "2" / v2["_changed"]
    data = bytearray(bad.read_bytes())
    bad.unlink()  # never write through a hard link shared with version 1
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))

    with pytest.raises(release.ChecksumError, match="sha256"):
        release.pull(srv.url, out)
    assert _snapshot(out) == before
    assert json.loads(paths.release_file(out).read_text())["version"] == "1"
    assert _count(out) == (N,)
    assert not list(paths.pull_dir(out).rglob("*.part")) and not (paths.pull_dir(out) / "switch.json").exists()
    assert sum(1 for p, _ in srv.log if p == "2/" + v2["_changed"]) == 2  # one fresh retry, then refused

    # a tampered manifest is refused too (latest.json holds its sha256)
    mf = paths.release_manifest(release_dir, "2")
    mf.write_text(mf.read_text().replace('"version": "2"', '"version": "2" '))
    with pytest.raises(release.ChecksumError, match="latest.json"):
        release.pull(srv.url, out)
    assert _snapshot(out) == before


def test_interrupted_transfer_resumes_with_range(release_dir, serve, tmp_path):
    srv = serve(release_dir)
    m = _manifest(release_dir, "1")
    target = max(m["files"], key=lambda e: e["size"])
    key = "1/" + target["path"]
    srv.cuts[key] = {"bytes": target["size"] // 2, "times": 1}
    out = tmp_path / "mine"
    res = release.pull(srv.url, out, jobs=2)
    assert target["path"] in res.fetched
    ranges = [r for p, r in srv.log if p == key]
    assert ranges == [None, f"bytes={target['size'] // 2}-"]
    assert release.sha256_file(out / target["path"]) == target["sha256"]
    assert _count(out) == (N,)


def test_interrupted_pull_leaves_the_ard_and_the_next_pull_resumes(source_ard, release_dir, serve, tmp_path):
    srv = serve(release_dir)
    out, before, v2 = _pulled_then_v2(source_ard, release_dir, srv, tmp_path)
    key = "2/" + v2["_changed"]
    size = next(e["size"] for e in v2["files"] if e["path"] == v2["_changed"])
    third = size // 3
    srv.cuts[key] = {"bytes": third, "times": 2}  # the connection drops twice

    with pytest.raises(release.TransferError, match="transfer failed"):
        release.pull(srv.url, out, retries=1)
    assert _snapshot(out) == before
    assert json.loads(paths.release_file(out).read_text())["version"] == "1"
    part = next(paths.pull_dir(out).rglob("*.part"))
    assert part.stat().st_size == 2 * third

    srv.log.clear()
    res = release.pull(srv.url, out)  # the server is healthy again
    assert res.version == "2" and res.fetched == [v2["_changed"]]
    assert [r for p, r in srv.log if p == key] == [f"bytes={2 * third}-"]
    assert release.sha256_file(out / v2["_changed"]) == next(e["sha256"] for e in v2["files"] if e["path"] == v2["_changed"])


def test_crash_during_switch_is_rolled_forward(source_ard, release_dir, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    release.pull(release_dir, out)
    v2 = _publish_v2(source_ard, release_dir, tmp_path)
    real = release._rebuild

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(release, "_rebuild", crash)
    with pytest.raises(KeyboardInterrupt):
        release.pull(release_dir, out)
    assert (paths.pull_dir(out) / "switch.json").exists()
    assert json.loads(paths.release_file(out).read_text())["version"] == "1"
    assert _count(out, "SELECT count(*) FROM core") == (N,)  # the old database still opens

    monkeypatch.setattr(release, "_rebuild", real)
    res = release.pull(release_dir, out)
    assert res.rolled_forward and res.version == "2" and res.fetched == []
    assert not (out / v2["_gone"]).exists()
    assert _count(out, "SELECT count(Web_Class) FROM ard") == (N - v2["_gone_rows"],)


# ----------------------------------------------------------------- command line
def test_cli_publish_and_pull(source_ard, tmp_path):
    runner = CliRunner()
    rel, out = tmp_path / "rel", tmp_path / "mine"
    r = runner.invoke(app, ["publish", str(source_ard), "--to", str(rel), "--version", "2025.1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "published release 2025.1" in " ".join(r.output.split())
    r = runner.invoke(app, ["pull", str(rel), "--out", str(out), "--layers", "lick,topology", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "installed release 2025.1" in " ".join(r.output.split())
    assert _count(out) == (N,)
    r = runner.invoke(app, ["pull", str(rel), "--out", str(source_ard), "--no-progress"])
    assert r.exit_code == 2 and "did not install" in " ".join(r.output.split())
    r = runner.invoke(app, ["pull", str(rel), "--out", str(out), "--region", "SQUARE 1 2", "--no-progress"])
    assert r.exit_code == 2 and "unknown kind" in " ".join(r.output.split())
