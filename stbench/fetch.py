"""``stbench data fetch NAME``: download a dataset from its public source into the folder its reader
looks in, with a checksum per file, resumable, or (``--offline``) only verify what is there.

A dataset says where its files come from in its spec (:attr:`stbench.specs.DatasetSpec.source`), so
this module knows no dataset by name. Two kinds of source:

* :class:`HttpSource`: files at plain URLs, listed in a manifest that ships with the plugin (one
  ``<sha256> <size> <id> <path>`` line per file). The checksums are part of the code, so a changed or
  tampered upstream file is refused rather than silently used.
* :class:`HuggingFaceSource`: files in a Hugging Face repository (gated ones included), fetched through
  ``huggingface_hub``, which handles the access token. The checksums are fetched from the Hub with the
  file list (the SHA-256 Git LFS records for large files, the git blob SHA-1 for small ones), at one
  commit, resolved once per fetch; shipping them is impossible for a collection of a thousand samples
  that keeps growing.

Either way the expected checksums, sizes and the source (URL, commit) of every file fetched are kept
in ``<dir>/.stbench-fetch.json``; ``--offline`` re-hashes the files against the manifest (HTTP) or that
record (Hugging Face) and touches no network.

Resuming: an HTTP download goes to ``<dir>/.stbench-partial/<path>`` and continues from its size with
a ``Range`` request when run again (a server that ignores ranges makes it start over); the whole file
is hashed before it is moved into place (fsync, then an atomic rename), so a reader never sees half a
file. A resumed file whose checksum is wrong is downloaded once more from the start. Hugging Face
downloads resume inside ``huggingface_hub`` (its ``.incomplete`` files under ``<dir>/.cache``).
A file already in place is hashed and kept when it matches; a file recorded by an earlier fetch with
the same size and modification time is trusted without hashing again (whole-slide images are GBs).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

from stbench import atomic
from stbench.data.layouts import natural_key
from stbench.errors import ConfigError, DataError, StbenchError

#: what a fetch records in the data directory: expected checksums, sizes and sources of the files
RECORD = ".stbench-fetch.json"
#: where unfinished HTTP downloads wait, inside the data directory (readers never look there)
PARTIAL_DIR = ".stbench-partial"
CHUNK = 1 << 20
#: seconds to wait for a connection or for the next bytes of a download
TIMEOUT_S = 60

Progress = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a source.

    Attributes:
        path: where it goes, relative to the data directory, ``/``-separated (``ST-cnts/A1.tsv.gz``).
        url: its URL (HTTP), or its path in the repository (Hugging Face).
        id: the sample or section it belongs to (``--ids`` selects by it); ``""``: every selection needs it.
        size: bytes, when known.
        sha256: its SHA-256, when known.
        git_sha1: its git blob SHA-1 (small files of a Hugging Face repository, which have no SHA-256).
    """

    path: str
    url: str
    id: str = ""
    size: Optional[int] = None
    sha256: Optional[str] = None
    git_sha1: Optional[str] = None


class Source:
    """Where a dataset's files come from (see the module docstring)."""

    #: the folder under ``$STBENCH_DATA`` (and the user cache) that the dataset's reader looks in
    folder: str
    #: one line: how to get access, or how to download by hand; ends every error about the source
    access: str
    #: whether ``--ids`` must be given (a collection too large to fetch whole)
    ids_required: ClassVar[bool] = False

    def describe(self) -> str:
        raise NotImplementedError

    def files(self, ids: Sequence[str]) -> tuple[list[RemoteFile], dict]:
        """The files to fetch for ``ids`` (all when empty), asking the source if need be, and what to
        record about the source (URL, commit)."""
        raise NotImplementedError

    def recorded_files(self, ids: Sequence[str], record: dict) -> list[RemoteFile]:
        """The files ``--offline`` verifies for ``ids``, without the network."""
        raise NotImplementedError

    def download(self, f: RemoteFile, root: Path, about: dict, progress: Progress = None) -> Path:
        """Download ``f`` into ``root / f.path`` (atomically); ``about``: what :meth:`files` said about
        the source (e.g. the commit). Returns that path."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# plain HTTP, with a shipped manifest


@dataclass(frozen=True)
class HttpSource(Source):
    """Files at ``base_url + path``, listed with their checksums in ``manifest``.

    Attributes:
        folder: the data folder the reader looks in (``her2st``).
        base_url: prefix of every file's URL, ending with ``/``.
        manifest: one line per file, ``<sha256> <size> <id> <path>``; id ``-`` for files every
            selection needs; ``#`` comments and blank lines ignored.
        access: how to download by hand when the source cannot be reached.
        description: where the files come from, for the summary.
    """

    folder: str
    base_url: str
    manifest: str
    access: str
    description: str = ""

    def describe(self) -> str:
        return self.description or self.base_url

    def entries(self) -> list[RemoteFile]:
        out = []
        for n, line in enumerate(self.manifest.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 3)
            if len(parts) != 4 or len(parts[0]) != 64 or not parts[1].isdigit():
                raise ValueError(f"manifest line {n} is not '<sha256> <size> <id> <path>': {line!r}")
            sha, size, ident, path = parts
            out.append(RemoteFile(path=path, url=self.base_url + path, id="" if ident == "-" else ident,
                                  size=int(size), sha256=sha.lower()))
        return out

    def _select(self, ids: Sequence[str]) -> list[RemoteFile]:
        entries = self.entries()
        known = sorted({e.id for e in entries if e.id}, key=natural_key)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(f"--ids: {', '.join(unknown)} not in this source; choose from {', '.join(known)}")
        return [e for e in entries if not ids or not e.id or e.id in ids]

    def files(self, ids):
        return self._select(ids), {"source": self.describe(), "base_url": self.base_url}

    def recorded_files(self, ids, record):
        return self._select(ids)

    def download(self, f, root, about, progress=None):
        return _http_download(f, root, self.access, progress)


def _http_download(f: RemoteFile, root: Path, access: str, progress: Progress = None) -> Path:
    """Download ``f.url`` to ``root / f.path``, resuming a partial download; verified, then renamed."""
    dest = root / f.path
    part = root / PARTIAL_DIR / f.path
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        start = part.stat().st_size if part.exists() else 0
        if f.size is not None and start > f.size:
            part.unlink()
            start = 0
        if f.size is None or start < f.size:  # a complete part (killed before the rename) needs no request
            start = _http_get(f.url, part, start, access)
        problem = _mismatch(part, f)
        if problem is None:
            _move_into_place(part, dest)
            return dest
        part.unlink()
        if start == 0:  # a whole, fresh download that does not match: the source is not what the manifest says
            raise DataError(f"{f.url}: {problem}: the file changed at the source or the transfer was corrupted; "
                            f"nothing was kept. Run again to retry; if it persists, {access}")
        # a resumed download that does not match: the kept part was damaged; start over once
    raise DataError(f"{f.url}: the download does not match its checksum twice; {access}")


def _http_get(url: str, part: Path, start: int, access: str) -> int:
    """Append ``url`` from byte ``start`` to ``part`` (a Range request); returns the byte it really
    started from (0 when the server sent the whole file)."""
    import urllib.error
    import urllib.request

    import stbench

    headers = {"User-Agent": f"stbench/{stbench.__version__}", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the kept part is not a prefix the server recognises: start over
            part.unlink()
            return _http_get(url, part, 0, access)
        raise _http_error(url, exc.code, exc.reason, access) from None
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(url, exc, access) from None
    with response:
        if start and response.status != 206:  # the server ignored the range and sends everything
            start = 0
        announced = response.headers.get("Content-Length")
        received = 0
        try:
            with open(part, "ab" if start else "wb") as fh:
                for block in iter(lambda: response.read(CHUNK), b""):
                    fh.write(block)
                    received += len(block)
                fh.flush()
                os.fsync(fh.fileno())
        except (OSError, http.client.HTTPException) as exc:  # a dropped connection, a timeout
            stopped = f"{type(exc).__name__}: {exc}"
        else:
            stopped = None if announced is None or received >= int(announced) else "the connection closed early"
        if stopped:  # what arrived stays in the partial file for the next run
            raise DataError(f"{url}: the download stopped after {_size(start + received)} ({stopped}); run the same "
                            "command again to resume it")
    return start


def _http_error(url: str, code: int, reason, access: str) -> DataError:
    if code in (401, 403):
        return DataError(f"{url}: access refused (HTTP {code}); {access}")
    if code == 404:
        return DataError(f"{url}: not found (HTTP 404): the source moved or renamed the file; {access}")
    return DataError(f"{url}: the server answered HTTP {code} {reason}; try again later, or {access}")


def _unreachable(url: str, exc: BaseException, access: str) -> DataError:
    from urllib.parse import urlsplit

    reason = getattr(exc, "reason", None) or exc
    return DataError(f"cannot reach {urlsplit(url).netloc} ({reason}); check the network connection or proxy, or {access}")


# ------------------------------------------------------------------------------------------------
# Hugging Face


@dataclass(frozen=True)
class HuggingFaceSource(Source):
    """Files of a Hugging Face repository, per sample id, fetched with ``huggingface_hub``.

    Attributes:
        folder: the data folder the reader looks in (``hest``).
        repo_id: the repository (``MahmoodLab/hest``).
        patterns: the files of one id, ``{id}`` replaced (``st/{id}.h5ad``); the same paths locally.
        optional: the patterns a sample may lack (e.g. its image).
        access: how to get access (a gated repository: accept the terms, log in).
        repo_type: ``dataset`` or ``model``.
        revision: branch, tag or commit; resolved to a commit once per fetch, and recorded.
        ids_required: True: ``--ids`` must be given.
    """

    folder: str
    repo_id: str
    patterns: tuple
    access: str
    optional: tuple = ()
    repo_type: str = "dataset"
    revision: str = "main"
    ids_required: bool = True
    description: str = ""

    def describe(self) -> str:
        return self.description or f"huggingface.co/{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=_hf_endpoint())

    def files(self, ids):
        from huggingface_hub.hf_api import RepoFile

        api = self._api()
        commit = self._call(lambda: api.repo_info(self.repo_id, repo_type=self.repo_type, revision=self.revision).sha)
        wanted = {p.format(id=i): (i, p) for i in ids for p in self.patterns}
        infos = self._call(lambda: api.get_paths_info(self.repo_id, list(wanted), repo_type=self.repo_type,
                                                      revision=commit, expand=True))
        found = {}
        for info in infos:
            if isinstance(info, RepoFile) and info.path in wanted:
                sha256 = info.lfs.sha256 if info.lfs is not None else None  # large files: Git LFS's SHA-256
                found[info.path] = RemoteFile(path=info.path, url=info.path, id=wanted[info.path][0], size=info.size,
                                              sha256=sha256, git_sha1=None if sha256 else info.blob_id)
        missing = [path for path, (i, pattern) in wanted.items() if path not in found and pattern not in self.optional]
        if missing:
            lost = sorted({wanted[p][0] for p in missing}, key=natural_key)
            raise DataError(f"{self.describe()} at {commit[:10]} has no {', '.join(missing[:4])}"
                            f"{' ...' if len(missing) > 4 else ''}: unknown id(s) {', '.join(lost)}; check --ids")
        absent = [p for p in wanted if p not in found]
        if absent:
            import warnings

            warnings.warn(f"{self.describe()} has no {', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''} "
                          "(optional: those samples come without it)", stacklevel=3)
        ordered = [found[p] for p in wanted if p in found]
        return ordered, {"source": self.describe(), "repo_id": self.repo_id, "repo_type": self.repo_type,
                         "revision": self.revision, "commit": commit}

    def recorded_files(self, ids, record):
        files = []
        for path, entry in (record.get("files") or {}).items():
            if ids and entry.get("id") not in ids:
                continue
            files.append(RemoteFile(path=path, url=entry.get("url", path), id=entry.get("id", ""), size=entry.get("size"),
                                    sha256=entry.get("sha256"), git_sha1=entry.get("git_sha1")))
        recorded = {f.id for f in files}
        never = [i for i in ids if i not in recorded]
        if never:
            raise DataError(f"--offline: {', '.join(never)} never fetched into this folder (no entry in {RECORD}); "
                            "run without --offline to download them")
        return files

    def download(self, f, root, about, progress=None):
        from huggingface_hub import hf_hub_download

        # every file from the commit resolved when the files were listed, whatever the branch does meanwhile
        path = self._call(lambda: hf_hub_download(self.repo_id, f.url, repo_type=self.repo_type,
                                                  revision=about.get("commit") or self.revision, local_dir=root,
                                                  endpoint=_hf_endpoint()))
        return Path(path)

    def _call(self, action):
        """Run a huggingface_hub call; its failures become one line naming the access step."""
        try:
            return action()
        except Exception as exc:  # huggingface_hub raises its own, httpx's and OSError subclasses
            raise _hf_error(self, exc) from None


def _hf_endpoint() -> Optional[str]:
    """``$HF_ENDPOINT`` read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def _hf_error(source: HuggingFaceSource, exc: BaseException) -> StbenchError:
    from huggingface_hub import errors, get_token

    where = source.describe()
    if isinstance(exc, StbenchError):
        return exc
    if isinstance(exc, errors.GatedRepoError):
        if get_token() is None:
            return DataError(f"{where} is gated and you are not logged in to Hugging Face; {source.access}")
        return DataError(f"{where} is gated and your Hugging Face token has no access to it yet; {source.access}")
    if isinstance(exc, errors.RepositoryNotFoundError):
        if get_token() is None:
            return DataError(f"{where} cannot be seen without logging in to Hugging Face; {source.access}")
        return DataError(f"{where} not found, or your token may not see it; {source.access}")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ConfigError(f"{where} has no revision {source.revision!r}; use a branch, tag or commit of the repository")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return DataError(f"{where}: access refused (HTTP {status}); {source.access}")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return DataError(f"{where}: {first}; try again later, or {source.access}")
    if isinstance(exc, (errors.LocalEntryNotFoundError, OSError)) or type(exc).__module__.startswith(("httpx", "requests")):
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return DataError(f"cannot reach {where} ({reason}); check the network connection, proxy or $HF_ENDPOINT, "
                         f"then run again (downloads resume)")
    raise exc


# ------------------------------------------------------------------------------------------------
# checking and recording


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def git_sha1_of(path: Path) -> str:
    """The git blob id: SHA-1 of ``"blob <size>\\0"`` and the content (what Hugging Face lists for small files)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(path: Path, f: RemoteFile) -> Optional[str]:
    """Why ``path`` is not ``f`` (None when it is): missing, wrong size, wrong checksum."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        return f"{size} bytes, expected {f.size}"
    if f.sha256:
        actual = sha256_of(path)
        if actual != f.sha256:
            return f"SHA-256 {actual[:12]}…, expected {f.sha256[:12]}…"
    elif f.git_sha1:
        actual = git_sha1_of(path)
        if actual != f.git_sha1:
            return f"git SHA-1 {actual[:12]}…, expected {f.git_sha1[:12]}…"
    return None


def _move_into_place(part: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)
    try:  # make the rename durable
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read_record(root: Path) -> dict:
    path = root / RECORD
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged record only costs re-hashing
    return data if isinstance(data, dict) else {}


def _entry(f: RemoteFile, path: Path) -> dict:
    st = path.stat()
    entry = {"id": f.id, "url": f.url, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry.update({"sha256": f.sha256} if f.sha256 else {"git_sha1": f.git_sha1} if f.git_sha1 else {})
    return entry


def _recorded_unchanged(path: Path, f: RemoteFile, record: dict) -> bool:
    """Verified by an earlier fetch against the same checksum, and unchanged since (size, mtime)."""
    entry = (record.get("files") or {}).get(f.path)
    if not entry or not path.is_file():
        return False
    st = path.stat()
    same_checksum = entry.get("sha256") == f.sha256 and entry.get("git_sha1") == f.git_sha1
    return same_checksum and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns


# ------------------------------------------------------------------------------------------------
# the fetch


@dataclass
class FetchReport:
    root: Path
    verified: list = field(default_factory=list)  # paths already in place and correct
    downloaded: list = field(default_factory=list)  # paths downloaded now
    bytes_downloaded: int = 0

    def summary(self, name: str, offline: bool) -> str:
        if offline:
            return f"{name}: all {len(self.verified)} files in {self.root} match their checksums"
        return (f"{name}: {len(self.downloaded)} file(s) downloaded ({_size(self.bytes_downloaded)}), "
                f"{len(self.verified)} already in place and verified, in {self.root}")


def fetch_dataset(source: Source, root: Path, ids: Sequence[str] = (), offline: bool = False,
                  progress: Progress = None) -> FetchReport:
    """Download the files of ``ids`` (every file when empty) into ``root``, or with ``offline`` only
    verify them. Raises a one-line :class:`DataError` naming the files that are missing or damaged
    (offline) or the access step (a gated or unreachable source)."""
    root = Path(root).expanduser()
    ids = list(dict.fromkeys(ids))
    if source.ids_required and not ids and not offline:
        raise ConfigError(f"{source.describe()} is too large to fetch whole; give --ids ID[,ID...] (sample ids)")
    record = _read_record(root)
    report = FetchReport(root)
    if offline:
        files = source.recorded_files(ids, record)
        if not files:
            raise DataError(f"--offline: nothing to verify in {root} (no file of this source is recorded there); "
                            "run without --offline to download")
        bad = []
        for n, f in enumerate(files, 1):
            if progress:
                progress(f"verifying [{n}/{len(files)}] {f.path}")
            problem = _mismatch(root / f.path, f)
            (bad.append(f"{f.path} ({problem})") if problem else report.verified.append(f.path))
        if bad:
            raise DataError(f"{len(bad)} of {len(files)} files in {root} are missing or damaged: {', '.join(bad[:4])}"
                            f"{' ...' if len(bad) > 4 else ''}; run the same command without --offline to download them")
        return report

    files, about = source.files(ids)
    record = {**record, **about, "files": dict(record.get("files") or {})}
    root.mkdir(parents=True, exist_ok=True)
    for n, f in enumerate(files, 1):
        dest = root / f.path
        if _recorded_unchanged(dest, f, record) or (dest.is_file() and _mismatch(dest, f) is None):
            report.verified.append(f.path)
        else:
            if progress:
                progress(f"downloading [{n}/{len(files)}] {f.path}" + (f" ({_size(f.size)})" if f.size else ""))
            if dest.exists():
                dest.unlink()  # damaged or another version: fetched again
            path = source.download(f, root, about, progress)
            problem = _mismatch(path, f)
            if problem:  # huggingface_hub does not check what it wrote against the listed checksum
                path.unlink()
                raise DataError(f"{f.url} from {source.describe()}: {problem}; nothing was kept. Run again to retry")
            report.downloaded.append(f.path)
            report.bytes_downloaded += path.stat().st_size
        record["files"][f.path] = _entry(f, dest)
        atomic.write_text(root / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")  # a kill keeps what is done
    _remove_empty(root / PARTIAL_DIR)
    return report


def _remove_empty(folder: Path) -> None:
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        pass


def _size(n: Optional[int]) -> str:
    if n is None:
        return "? bytes"
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ------------------------------------------------------------------------------------------------
# the command


def source_of(name: str, plugins=None) -> Source:
    """The download source a dataset declares (:attr:`stbench.specs.DatasetSpec.source`)."""
    from stbench.plugins import get_plugins
    from stbench.specs import resolve

    spec = (plugins or get_plugins()).datasets.get(name, "stbench data fetch NAME")
    declared = spec.source
    if declared is None:
        raise ConfigError(f"dataset {name} declares no download source; download it by hand "
                          f"({spec.reference or spec.description or 'see the plugin'}) and pass --data-dir")
    source = resolve(declared) if isinstance(declared, str) else declared
    if not isinstance(source, Source) and callable(source):
        source = source()
    if not isinstance(source, Source):
        raise ConfigError(f"dataset {name}: its source must be an HttpSource or HuggingFaceSource, got {type(source).__name__}")
    return source


def add_fetch_arguments(parser) -> None:
    """The options of ``stbench data fetch``."""
    parser.add_argument("name", metavar="NAME", help="dataset (stbench list datasets)")
    parser.add_argument("--ids", help="comma-separated sample or section ids (default: all; required for HEST-1k)")
    parser.add_argument("--to", help="the data folder (default: $STBENCH_DATA/<folder>, else the user cache), "
                                     "where stbench reads it without --data-dir")
    parser.add_argument("--offline", action="store_true",
                        help="download nothing: verify the files already there against their checksums")


def cmd_fetch(args) -> int:
    """``stbench data fetch NAME``: download (or verify) and print a one-line summary."""
    from stbench.paths import default_data_dir

    source = source_of(args.name)
    root = Path(args.to).expanduser() if args.to else default_data_dir(source.folder)[0]
    ids = [i.strip() for i in (args.ids or "").split(",") if i.strip()]

    def progress(message: str) -> None:
        print(f"stbench: fetch: {message}", file=sys.stderr, flush=True)

    report = fetch_dataset(source, root, ids, offline=args.offline, progress=progress)
    print(report.summary(args.name, args.offline))
    return 0
