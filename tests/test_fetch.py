"""stbench data fetch (stbench.fetch): downloads from a local HTTP server on 127.0.0.1 and a fake
Hugging Face Hub there; no test reaches the internet."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import types
import urllib.parse

import pytest

from stbench import hookimpl
from stbench.cli import main
from stbench.errors import ConfigError, DataError
from stbench.fetch import PARTIAL_DIR, RECORD, HttpSource, HuggingFaceSource, fetch_dataset, git_sha1_of
from stbench.specs import DatasetSpec

from tests.conftest import SHARED_HER2

ACCESS = "download it by hand from the test server"


# ------------------------------------------------------------------------------------------------
# a small HTTP server with Range support and injectable faults


class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # URL path -> content
        self.log: list[tuple] = []  # (method, path, Range header, bytes sent)
        self.forbidden: set = set()
        self.drop_once: set = set()  # paths whose next GET stops half-way
        self.ignore_range = False
        self.hub = None  # a FakeHub answering /api/... and /datasets/... when set
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                server.hub.post(self, form)

            def _serve(self, body):
                path = urllib.parse.urlsplit(self.path).path
                if server.hub is not None and server.hub.handles(path):
                    return server.hub.get(self, path, body)
                if path in server.forbidden:
                    return self._empty(403)
                if path not in server.files:
                    return self._empty(404)
                send_bytes(self, server.files[path], body, server, path)

            def _empty(self, code, headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send_bytes(handler, content: bytes, body: bool, server: Server, path: str, headers=()):
    """200 or 206 (Range), optionally dropping the connection half-way once."""
    start = 0
    wanted = handler.headers.get("Range")
    if wanted and not server.ignore_range and body:
        start = int(wanted.removeprefix("bytes=").split("-")[0])
        if start >= len(content):
            handler.send_response(416)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
    part = content[start:]
    handler.send_response(206 if start else 200)
    for k, v in headers:
        handler.send_header(k, v)
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
    handler.send_header("Content-Length", str(len(part)))
    handler.end_headers()
    sent = 0
    if body:
        if path in server.drop_once:
            server.drop_once.discard(path)
            part = part[: len(part) // 2]
            handler.close_connection = True
        handler.wfile.write(part)
        handler.wfile.flush()
        sent = len(part)
    server.log.append((handler.command, path, wanted, sent))


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _content(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def _manifest(files: dict[str, tuple[str, bytes]]) -> str:
    """``<sha256> <size> <id> <path>`` lines; files: path -> (id, content)."""
    return "\n".join(f"{hashlib.sha256(c).hexdigest()} {len(c)} {i or '-'} {p}" for p, (i, c) in files.items())


@pytest.fixture
def dataset(server):
    """A three-file source on the server: two sections and one shared file."""
    files = {"cnts/S1.tsv": ("S1", _content(300_000, 1)), "cnts/S2.tsv": ("S2", _content(200_000, 2)),
             "README": ("", b"shared\n")}
    for path, (_, content) in files.items():
        server.files[f"/data/{path}"] = content
    source = HttpSource(folder="tiny", base_url=f"{server.url}/data/", manifest=_manifest(files), access=ACCESS)
    return source, {p: c for p, (_, c) in files.items()}


def _gets(server):
    return [entry for entry in server.log if entry[0] == "GET"]


# ------------------------------------------------------------------------------------------------
# HTTP sources


def test_fetch_downloads_verifies_and_records_then_skips(dataset, server, tmp_path):
    source, files = dataset
    report = fetch_dataset(source, tmp_path / "d")
    assert sorted(report.downloaded) == sorted(files) and report.verified == []
    for path, content in files.items():
        assert (tmp_path / "d" / path).read_bytes() == content
    record = json.loads((tmp_path / "d" / RECORD).read_text())
    assert record["files"]["cnts/S1.tsv"]["sha256"] == hashlib.sha256(files["cnts/S1.tsv"]).hexdigest()
    assert not (tmp_path / "d" / PARTIAL_DIR).exists()
    server.log.clear()
    again = fetch_dataset(source, tmp_path / "d")
    assert again.downloaded == [] and sorted(again.verified) == sorted(files) and server.log == []  # no request


def test_ids_select_files_and_unknown_ids_are_refused(dataset, tmp_path):
    source, _ = dataset
    report = fetch_dataset(source, tmp_path, ids=["S2"])
    assert sorted(report.downloaded) == ["README", "cnts/S2.tsv"]
    assert not (tmp_path / "cnts/S1.tsv").exists()
    with pytest.raises(ConfigError, match=r"--ids: S9 not in this source; choose from S1, S2"):
        fetch_dataset(source, tmp_path, ids=["S9"])


def test_a_dropped_download_resumes_with_a_range_request(dataset, server, tmp_path):
    source, files = dataset
    server.drop_once.add("/data/cnts/S1.tsv")
    with pytest.raises(DataError, match=r"cnts/S1.tsv: the download stopped .*run the same command again to resume"):
        fetch_dataset(source, tmp_path, ids=["S1"])
    part = tmp_path / PARTIAL_DIR / "cnts/S1.tsv"
    assert 0 < part.stat().st_size < len(files["cnts/S1.tsv"]) and not (tmp_path / "cnts/S1.tsv").exists()
    kept = part.stat().st_size
    server.log.clear()
    fetch_dataset(source, tmp_path, ids=["S1"])
    assert (tmp_path / "cnts/S1.tsv").read_bytes() == files["cnts/S1.tsv"]
    [(method, path, wanted, sent)] = [g for g in _gets(server) if g[1] == "/data/cnts/S1.tsv"]
    assert wanted == f"bytes={kept}-" and sent == len(files["cnts/S1.tsv"]) - kept  # only the rest travelled


def test_a_damaged_partial_download_is_redone_from_the_start(dataset, server, tmp_path):
    source, files = dataset
    part = tmp_path / PARTIAL_DIR / "cnts/S1.tsv"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # not a prefix of the real file
    fetch_dataset(source, tmp_path, ids=["S1"])
    assert (tmp_path / "cnts/S1.tsv").read_bytes() == files["cnts/S1.tsv"]
    ranges = [g[2] for g in _gets(server) if g[1] == "/data/cnts/S1.tsv"]
    assert ranges == ["bytes=1000-", None]  # resumed, failed its checksum, fetched whole once more


def test_a_server_that_ignores_ranges_sends_everything_again(dataset, server, tmp_path):
    source, files = dataset
    server.ignore_range = True
    part = tmp_path / PARTIAL_DIR / "cnts/S2.tsv"
    part.parent.mkdir(parents=True)
    part.write_bytes(files["cnts/S2.tsv"][:5000])
    fetch_dataset(source, tmp_path, ids=["S2"])
    assert (tmp_path / "cnts/S2.tsv").read_bytes() == files["cnts/S2.tsv"]


def test_a_file_that_changed_at_the_source_is_refused(dataset, server, tmp_path):
    source, _ = dataset
    server.files["/data/cnts/S2.tsv"] = _content(200_000, 99)  # same size, other bytes
    with pytest.raises(DataError, match=r"cnts/S2.tsv: SHA-256 \w+…, expected \w+…: the file changed at the source") as err:
        fetch_dataset(source, tmp_path, ids=["S2"])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cnts/S2.tsv").exists() and not (tmp_path / PARTIAL_DIR / "cnts/S2.tsv").exists()


def test_a_damaged_file_in_place_is_downloaded_again(dataset, tmp_path):
    source, files = dataset
    fetch_dataset(source, tmp_path)
    (tmp_path / "cnts/S1.tsv").write_bytes(b"oops")
    report = fetch_dataset(source, tmp_path)
    assert report.downloaded == ["cnts/S1.tsv"]
    assert (tmp_path / "cnts/S1.tsv").read_bytes() == files["cnts/S1.tsv"]


def test_offline_only_verifies_and_names_what_is_wrong(dataset, server, tmp_path):
    source, files = dataset
    fetch_dataset(source, tmp_path)
    server.log.clear()
    assert len(fetch_dataset(source, tmp_path, offline=True).verified) == 3
    (tmp_path / "cnts/S1.tsv").write_bytes(files["cnts/S1.tsv"][:-1] + b"X")
    (tmp_path / "README").unlink()
    with pytest.raises(DataError, match=r"2 of 3 files .* cnts/S1.tsv \(SHA-256 .*\), README \(missing\); run the same "
                                        r"command without --offline"):
        fetch_dataset(source, tmp_path, offline=True)
    assert server.log == []  # offline: no request at all


def test_gated_or_unreachable_sources_fail_in_one_line_naming_the_access_step(dataset, server, tmp_path):
    source, _ = dataset
    server.forbidden.add("/data/cnts/S1.tsv")
    with pytest.raises(DataError, match=rf"access refused \(HTTP 403\); {ACCESS}$"):
        fetch_dataset(source, tmp_path, ids=["S1"])
    closed = HttpSource(folder="tiny", base_url="http://127.0.0.1:9/data/", manifest=source.manifest, access=ACCESS)
    with pytest.raises(DataError, match=rf"cannot reach 127.0.0.1:9 .*; check the network connection or proxy, or {ACCESS}$") as err:
        fetch_dataset(closed, tmp_path, ids=["S1"])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# the command, through a dataset's spec


def _dataset_plugin(source):
    module = types.ModuleType("tiny_plugin")

    @hookimpl
    def stbench_register_datasets(register):
        register(DatasetSpec(name="tiny", factory=lambda d, o: None, source=source))
        register(DatasetSpec(name="nosource", factory=lambda d, o: None, reference="somewhere.org"))

    module.stbench_register_datasets = stbench_register_datasets
    return module


def test_cli_fetches_into_the_folder_readers_look_in(dataset, monkeypatch, tmp_path, capsys):
    from tests.test_plugins import FakeDist, FakeEntryPoint, _fake_entry_points

    source, files = dataset
    _fake_entry_points(monkeypatch, FakeEntryPoint("tiny", lambda: _dataset_plugin(source), FakeDist("stbench-tiny")))
    monkeypatch.setenv("STBENCH_DATA", str(tmp_path / "data"))
    assert main(["data", "fetch", "tiny", "--ids", "S1"]) == 0
    assert (tmp_path / "data" / "tiny" / "cnts/S1.tsv").read_bytes() == files["cnts/S1.tsv"]  # $STBENCH_DATA/<folder>
    assert "tiny: 2 file(s) downloaded" in capsys.readouterr().out
    assert main(["data", "fetch", "tiny", "--ids", "S1", "--offline"]) == 0
    assert "all 2 files" in capsys.readouterr().out
    assert main(["data", "fetch", "tiny", "--to", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "cnts/S2.tsv").exists()
    capsys.readouterr()
    assert main(["data", "fetch", "nosource"]) == 2
    err = capsys.readouterr().err
    assert "dataset nosource declares no download source; download it by hand (somewhere.org)" in err
    assert err.count("\n") == 1


def test_her2_manifest_matches_the_project_copy(monkeypatch, capsys):
    """The shipped checksums are those of ../shared/data/her2st, file for file; a spec names the
    source lazily ("module:attribute")."""
    from stbench_plugins.her2.sources import SOURCE
    from tests.test_plugins import FakeDist, FakeEntryPoint, _fake_entry_points

    if not (SHARED_HER2 / "ST-cnts").is_dir():
        pytest.skip(f"real HER2+ data not found at {SHARED_HER2}")
    _fake_entry_points(monkeypatch, FakeEntryPoint("h", lambda: _dataset_plugin("stbench_plugins.her2.sources:SOURCE"),
                                                   FakeDist("stbench-h")))
    assert main(["data", "fetch", "tiny", "--offline", "--to", str(SHARED_HER2), "--ids", "C2,C3"]) == 0
    assert "all 7 files" in capsys.readouterr().out  # 2 sections x (counts, spot file, image) + the labels README
    report = fetch_dataset(SOURCE, SHARED_HER2, offline=True)
    on_disk = sorted(str(p.relative_to(SHARED_HER2)) for p in SHARED_HER2.rglob("*") if p.is_file())
    assert sorted(report.verified) == on_disk and len(on_disk) == 87
    assert SOURCE.folder == "her2st" and SOURCE.base_url.startswith("https://raw.githubusercontent.com/almaan/her2st/")
    sections = {e.id for e in SOURCE.entries() if e.path.startswith("ST-cnts/")}
    assert len(sections) == 36


# ------------------------------------------------------------------------------------------------
# Hugging Face, against a fake Hub on the same server


COMMIT = "c0ffee" + "0" * 34


class FakeHub:
    """The few Hub endpoints huggingface_hub calls: revision info, paths-info, resolve (HEAD/GET)."""

    def __init__(self, server: Server, repo: str, files: dict[str, bytes], lfs=(".h5ad", ".tif")):
        self.server, self.repo, self.files, self.lfs = server, repo, files, lfs
        self.gated = False
        self.served: dict[str, bytes] = {}  # path -> bytes sent instead of the listed ones

    def handles(self, path):
        return path.startswith(("/api/", "/datasets/"))

    def _refuse(self, h):
        h.send_response(401)
        h.send_header("X-Error-Code", "GatedRepo")
        h.send_header("X-Error-Message", "Access to this dataset is restricted")
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _json(self, h, data):
        body = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _sha1(self, content):
        return hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()

    def get(self, h, path, body):
        if self.gated:
            return self._refuse(h)
        if path == f"/api/datasets/{self.repo}/revision/main":
            return self._json(h, {"id": self.repo, "sha": COMMIT, "private": False})
        prefix = f"/datasets/{self.repo}/resolve/{COMMIT}/"
        name = path.removeprefix(prefix)
        if not path.startswith(prefix) or name not in self.files:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("Content-Length", "0")
            return h.end_headers()
        content = self.files[name]
        headers = [("X-Repo-Commit", COMMIT), ("ETag", f'"{self._sha1(content)}"')]
        content = self.served.get(name, content)  # what the storage really sends
        if name.endswith(self.lfs):
            headers += [("X-Linked-Etag", f'"{hashlib.sha256(content).hexdigest()}"'), ("X-Linked-Size", str(len(content)))]
        send_bytes(h, content, body, self.server, path, headers)

    def post(self, h, form):
        if self.gated:
            return self._refuse(h)
        out = []
        for p in form.get("paths", []):
            if p in self.files:
                c = self.files[p]
                entry = {"type": "file", "path": p, "size": len(c), "oid": self._sha1(c)}
                if p.endswith(self.lfs):
                    entry["lfs"] = {"oid": hashlib.sha256(c).hexdigest(), "size": len(c), "pointerSize": 134}
                out.append(entry)
        self._json(h, out)


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    files = {"st/S1.h5ad": _content(50_000, 3), "metadata/S1.json": b'{"st_technology": "Visium"}\n',
             "wsis/S1.tif": _content(80_000, 4), "st/S2.h5ad": _content(40_000, 5), "metadata/S2.json": b"{}\n"}
    server.hub = FakeHub(server, "Lab/hest", files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no user token or cache
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    source = HuggingFaceSource(folder="hest", repo_id="Lab/hest", patterns=("st/{id}.h5ad", "metadata/{id}.json", "wsis/{id}.tif"),
                               optional=("wsis/{id}.tif",), access="accept the terms, then hf auth login")
    return source, files


def test_huggingface_samples_by_id_with_checksums_from_the_hub(hub, server, tmp_path):
    source, files = hub
    root = tmp_path / "hest"
    with pytest.warns(UserWarning, match=r"has no wsis/S2.tif .*optional"):
        report = fetch_dataset(source, root, ids=["S1", "S2"])
    assert sorted(report.downloaded) == sorted(files)
    for path, content in files.items():
        assert (root / path).read_bytes() == content  # in the reader's layout: st/, metadata/, wsis/
    record = json.loads((root / RECORD).read_text())
    assert record["commit"] == COMMIT and record["repo_id"] == "Lab/hest"
    assert record["files"]["st/S1.h5ad"]["sha256"] == hashlib.sha256(files["st/S1.h5ad"]).hexdigest()
    assert record["files"]["metadata/S1.json"]["git_sha1"] == git_sha1_of(root / "metadata/S1.json")
    # offline: from the record, no request
    server.log.clear()
    assert len(fetch_dataset(source, root, ids=["S1"], offline=True).verified) == 3
    (root / "metadata/S2.json").write_bytes(b"{}\r")  # same size, other bytes
    with pytest.raises(DataError, match=r"metadata/S2.json \(git SHA-1"):
        fetch_dataset(source, root, offline=True)
    with pytest.raises(DataError, match=r"--offline: S7 never fetched"):
        fetch_dataset(source, root, ids=["S7"], offline=True)
    assert server.log == []


def test_a_huggingface_file_that_does_not_match_the_listed_checksum_is_not_kept(hub, server, tmp_path):
    source, files = hub
    server.hub.served["st/S1.h5ad"] = _content(50_000, 77)  # same size, other bytes
    with pytest.raises(DataError, match=r"st/S1.h5ad from huggingface.co/datasets/Lab/hest: SHA-256 .*nothing was kept"):
        fetch_dataset(source, tmp_path, ids=["S1"])
    assert not (tmp_path / "st/S1.h5ad").exists()


def test_huggingface_source_needs_ids_and_knows_its_ids(hub, tmp_path):
    source, _ = hub
    with pytest.raises(ConfigError, match="too large to fetch whole; give --ids"):
        fetch_dataset(source, tmp_path)
    with pytest.raises(DataError, match=r"has no st/S9.h5ad, metadata/S9.json: unknown id\(s\) S9; check --ids"):
        fetch_dataset(source, tmp_path, ids=["S9"])


def test_a_gated_hub_fails_in_one_line_naming_the_access_step(hub, server, tmp_path):
    source, _ = hub
    server.hub.gated = True
    with pytest.raises(DataError, match=r"is gated and you are not logged in to Hugging Face; accept the terms, then hf auth login$") as err:
        fetch_dataset(source, tmp_path, ids=["S1"])
    assert "\n" not in str(err.value)


def test_hest_source_declares_the_reader_layout():
    from stbench_plugins.hest.reader import FOLDER
    from stbench_plugins.hest.sources import SOURCE

    assert SOURCE.folder == FOLDER and SOURCE.repo_id == "MahmoodLab/hest" and SOURCE.ids_required
    assert {p.format(id="X") for p in SOURCE.patterns} == {"st/X.h5ad", "metadata/X.json", "wsis/X.tif"}
    assert "huggingface.co/datasets/MahmoodLab/hest" in SOURCE.access and "hf auth login" in SOURCE.access
