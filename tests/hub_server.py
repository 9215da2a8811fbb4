"""A loopback stand-in for the Hugging Face Hub: the routes ``huggingface_hub`` and ``datasets`` use to push a
model or a dataset and to list and read a dataset's files.

Tests point the real clients at it (``HF_ENDPOINT=http://127.0.0.1:PORT`` in a subprocess, or
``HfApi(endpoint=...)``) and look at the files that arrive in ``LocalHub.repo_dir(repo_id, repo_type)``. Routes
(``{type}`` is ``models``, ``datasets`` or ``spaces``; a model repo's file routes have no ``{type}`` prefix, a
dataset's have ``datasets/``, a Space's ``spaces/``):

- ``GET  /api/whoami-v2``                                   token check (401 for a wrong token)
- ``GET  /api/agent-harnesses``                             the (empty) registry the client reads for its user agent
- ``POST /api/repos/create``                                ``{"url": ...}``; 409 when the repo exists
- ``POST /api/validate-yaml``                               README metadata must be a YAML mapping
- ``POST /api/{type}/{repo}/preupload/{rev}``               upload mode per file: ``lfs`` for paths matching
                                                            ``lfs_patterns`` (non-empty files), else ``regular``
- ``POST /{repo}.git/info/lfs/objects/batch``               LFS batch API, "basic" transfer to the two routes below
  (also ``/datasets/{repo}.git/...``)
- ``PUT  /lfs-objects/{oid}``, ``POST /lfs-verify/{oid}``   store a blob (sha256-checked), verify it
- ``POST /api/{type}/{repo}/commit/{rev}``                  NDJSON commit: ``file``, ``lfsFile``, ``deletedFile``
                                                            and ``deletedFolder`` lines; atomic (all or nothing)
- ``GET  /api/{type}/{repo}[/revision/{rev}]``              repo info: ``sha``, ``private``, ``siblings``
- ``GET  /api/{type}/{repo}/tree/{rev}[/{path}]``           a folder's entries (``recursive``, ``expand``)
- ``POST /api/{type}/{repo}/paths-info/{rev}``              the entries of the form's ``paths``
- ``HEAD``/``GET /[datasets/|spaces/]{repo}/resolve/{rev}/{path}``  a file's bytes, with ``Range: bytes=a-b`` (206 and
                                                            ``Content-Range``; 416 past the end)

``rev`` is ``main`` or the repo's current commit sha (the server keeps one revision, the latest). Authorisation
follows the Hub: a request whose ``Authorization`` token is not ``token`` is refused (401, "Invalid credentials
in Authorization header"); a private repo read without a token, or a missing repo, is 401 without a token and 404
with one, both with ``X-Error-Code: RepoNotFound``; a missing revision or file is 404 ``RevisionNotFound`` /
``EntryNotFound``.

Every request is recorded in ``requests`` as ``(method, path)``, every file served in ``served`` as ``(method,
path, range header, bytes sent)`` (only the range is read from disk); anything else is answered 404 and recorded in ``unexpected``. ``stall_on``, a
predicate of ``(method, path)``, holds a matching request unanswered until ``release`` is set (``stalled`` is set
once it arrives), then drops the connection: a test kills the client meanwhile, as a user interrupts an upload.
Xet storage is not implemented: with ``hf_xet`` installed the client only needs it for files the server marks
``lfs``, so tests either keep ``lfs_patterns`` empty or set ``HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class _Repo:
    repo_type: str  # "model" or "dataset"
    private: bool
    sha: str
    lfs: dict[str, str] = field(default_factory=dict)  # path -> sha256 of the files stored as LFS objects
    commit_title: str = "initial commit"


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a regular file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that closes a connection early (a stream stopped mid-file, a killed upload) is normal."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalHub:
    """Serve on ``127.0.0.1`` (random port) from a thread; use as a context manager."""

    def __init__(self, root: str | Path, token: str = "hf_test_token", lfs_patterns: tuple[str, ...] = ()):
        self.root = Path(root)
        self.token = token
        self.lfs_patterns = lfs_patterns
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.served: list[tuple[str, str, str | None, int]] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.repos: dict[tuple[str, str], _Repo] = {}
        self._blob_ids: dict[tuple[str, int, int], str] = {}
        self.stall_on: Callable[[str, str], bool] | None = None
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / ("repos" if repo_type == "model" else f"{repo_type}s") / repo_id

    def blob_path(self, oid: str) -> Path:
        return self.root / "lfs" / oid

    def blob_id(self, path: Path) -> str:
        """:func:`git_blob_id` of a stored file, computed once per version of it."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._blob_ids:
                self._blob_ids[key] = git_blob_id(path.read_bytes())
            return self._blob_ids[key]

    def bytes_served(self, path_contains: str = "") -> int:
        """Total file bytes sent by the resolve route (to paths containing ``path_contains``)."""
        with self._lock:
            return sum(size for _, path, _, size in self.served if path_contains in path)

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _make_handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep pytest output quiet
            pass

        # -------------------------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _reply(self, status: int, payload=None, headers: dict | None = None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._reply(status, {"error": message}, headers)

        def _token(self) -> str | None:
            value = self.headers.get("Authorization")
            return value[len("Bearer ") :] if value and value.startswith("Bearer ") else value

        def _authorised(self) -> bool:
            if self._token() == hub.token:
                return True
            self._error(401, None, "Invalid credentials in Authorization header")
            return False

        def _readable(self, repo_type: str, repo_id: str) -> _Repo | None:
            """The repo if this request may read it, else None (the refusal has been sent)."""
            token = self._token()
            if token is not None and token != hub.token:
                self._error(401, None, "Invalid credentials in Authorization header")
                return None
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None or (repo.private and token is None):
                status = 401 if token is None else 404
                self._error(status, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _revision(self, repo: _Repo, revision: str) -> bool:
            if unquote(revision) in ("main", repo.sha):
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
            return False

        def _route(self, method: str) -> None:
            split = urlsplit(self.path)
            path, query = unquote(split.path), parse_qs(split.query)
            body = self._body()
            with hub._lock:
                hub.requests.append((method, path))
            if hub.stall_on is not None and hub.stall_on(method, path):
                hub.stalled.set()
                hub.release.wait(120)
                self.close_connection = True
                return
            parts = path.strip("/").split("/")
            api_repo = (
                len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets", "spaces")
            )  # /api/{type}s/{owner}/{name}/...
            if method == "GET" and path == "/api/whoami-v2":
                if self._authorised():
                    self._reply(200, {"type": "user", "name": "tester", "auth": {"type": "access_token"}})
            elif method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry
                self._reply(200, {"standardEnvVars": [], "harnesses": {}})
            elif method == "POST" and path == "/api/repos/create":
                if self._authorised():
                    self._create_repo(json.loads(body))
            elif method == "POST" and path == "/api/validate-yaml":
                self._validate_yaml(json.loads(body))
            elif method == "POST" and api_repo and len(parts) == 6 and parts[4] in ("preupload", "commit"):
                if self._authorised():
                    repo_type, repo_id = parts[1][:-1], f"{parts[2]}/{parts[3]}"
                    if parts[4] == "preupload":
                        self._preupload(repo_type, repo_id, json.loads(body))
                    else:
                        self._commit(repo_type, repo_id, body)
            elif (
                method == "GET"
                and api_repo
                and (len(parts) == 4 or (len(parts) == 6 and parts[4] == "revision"))
            ):
                self._repo_info(
                    parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[5] if len(parts) == 6 else "main"
                )
            elif method == "GET" and api_repo and len(parts) >= 6 and parts[4] == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                expand = query.get("expand", ["false"])[0].lower() == "true"
                self._tree(
                    parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[5], "/".join(parts[6:]), recursive, expand
                )
            elif method == "POST" and api_repo and len(parts) == 6 and parts[4] == "paths-info":
                form = parse_qs(body.decode())
                expand = form.get("expand", ["False"])[0].lower() == "true"
                self._paths_info(
                    parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[5], form.get("paths", []), expand
                )
            elif method in ("GET", "HEAD") and "resolve" in parts:
                at = parts.index("resolve")
                prefix = parts[:at]
                typed = len(prefix) == 3 and prefix[0] in ("datasets", "spaces")
                repo_type = prefix[0][:-1] if typed else "model"
                if len(prefix) != (3 if repo_type != "model" else 2) or len(parts) < at + 3:
                    self._not_found(method, path)
                else:
                    self._resolve(
                        method, repo_type, "/".join(prefix[-2:]), parts[at + 1], "/".join(parts[at + 2 :])
                    )
            elif method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                if self._authorised():
                    self._lfs_batch(json.loads(body))
            elif method == "PUT" and len(parts) == 2 and parts[0] == "lfs-objects":
                self._lfs_store(parts[1], body)
            elif method == "POST" and len(parts) == 2 and parts[0] == "lfs-verify":
                exists = hub.blob_path(parts[1]).is_file()
                self._reply(200 if exists else 404, {} if exists else {"error": "object not found"})
            else:
                self._not_found(method, path)

        def _not_found(self, method: str, path: str) -> None:
            with hub._lock:
                hub.unexpected.append((method, path))
            self._reply(404, {"error": f"no route {method} {path} in the test hub"})

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        # ------------------------------------------------------------------------------ write routes
        def _create_repo(self, payload: dict) -> None:
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
            url = (
                f"{hub.endpoint}/{repo_id}"
                if repo_type == "model"
                else f"{hub.endpoint}/{repo_type}s/{repo_id}"
            )
            if (repo_type, repo_id) in hub.repos or hub.repo_dir(repo_id, repo_type).exists():
                self._reply(409, {"error": f"You already created this {repo_type} repo", "url": url})
                return
            hub.repo_dir(repo_id, repo_type).mkdir(parents=True)
            private = payload.get("private") is True or payload.get("visibility") == "private"
            hub.repos[(repo_type, repo_id)] = _Repo(
                repo_type, private, hashlib.sha1(repo_id.encode()).hexdigest()
            )
            hub.created.append({"repo_id": repo_id, **payload})
            self._reply(200, {"url": url, "name": repo_id})

        def _validate_yaml(self, payload: dict) -> None:
            content = payload.get("content", "")
            if not content.startswith("---\n") or "\n---\n" not in content[3:]:
                self._reply(400, {"errors": [{"message": "README.md has no YAML metadata block"}]})
                return
            try:
                metadata = yaml.safe_load(content[4 : content.index("\n---\n", 3)])
            except yaml.YAMLError as error:
                self._reply(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
                return
            if not isinstance(metadata, dict):
                self._reply(400, {"errors": [{"message": "metadata is not a mapping"}]})
                return
            self._reply(200, {"errors": [], "warnings": []})

        def _preupload(self, repo_type: str, repo_id: str, payload: dict) -> None:
            if not hub.repo_dir(repo_id, repo_type).is_dir():
                self._error(404, "RepoNotFound", "Repository not found")
                return
            files = []
            for item in payload["files"]:
                lfs = item["size"] > 0 and any(fnmatch.fnmatch(item["path"], p) for p in hub.lfs_patterns)
                files.append(
                    {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                )
            self._reply(
                200,
                {
                    "files": files,
                    "commitOid": hub.repos.get((repo_type, repo_id), _Repo("", False, "0" * 40)).sha,
                },
            )

        def _lfs_batch(self, payload: dict) -> None:
            objects = []
            for item in payload["objects"]:
                oid = item["oid"]
                objects.append(
                    {
                        "oid": oid,
                        "size": item["size"],
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": f"{hub.endpoint}/lfs-objects/{oid}", "header": {}},
                            "verify": {"href": f"{hub.endpoint}/lfs-verify/{oid}", "header": {}},
                        },
                    }
                )
            self._reply(200, {"transfer": "basic", "objects": objects})

        def _lfs_store(self, oid: str, data: bytes) -> None:
            if hashlib.sha256(data).hexdigest() != oid:
                self._reply(400, {"error": "sha256 of the uploaded object does not match its oid"})
                return
            hub.blob_path(oid).parent.mkdir(parents=True, exist_ok=True)
            hub.blob_path(oid).write_bytes(data)
            self._reply(200, {})

        def _commit(self, repo_type: str, repo_id: str, body: bytes) -> None:
            if self.headers.get("Content-Type") != "application/x-ndjson":
                self._reply(400, {"error": "commit payload must be application/x-ndjson"})
                return
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                self._reply(400, {"error": "the first NDJSON line must be the commit header"})
                return
            files: dict[str, bytes] = {}
            lfs: dict[str, str] = {}
            deleted: list[tuple[str, bool]] = []
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    blob = hub.blob_path(value["oid"])
                    if not blob.is_file():
                        self._reply(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                        return
                    files[value["path"]] = blob.read_bytes()
                    lfs[value["path"]] = value["oid"]
                elif line["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append((value["path"], line["key"] == "deletedFolder"))
                else:
                    self._reply(400, {"error": f"unsupported commit operation {line['key']!r}"})
                    return
            root = hub.repo_dir(repo_id, repo_type)
            repo = hub.repos.get((repo_type, repo_id))
            for relpath, is_folder in deleted:  # checked before anything changes: a commit is all or nothing
                target = root / relpath
                if not (target.is_dir() if is_folder else target.is_file()):
                    self._error(404, "EntryNotFound", f"{relpath} does not exist in {repo_id}")
                    return
            for relpath, is_folder in deleted:
                target = root / relpath.rstrip("/")
                shutil.rmtree(target) if is_folder else target.unlink()
                if repo is not None:
                    for known in [
                        p for p in repo.lfs if p == relpath or p.startswith(relpath.rstrip("/") + "/")
                    ]:
                        del repo.lfs[known]
            for relpath, data in files.items():
                target = root / relpath
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                if repo is not None:
                    repo.lfs.pop(relpath, None)
                    if relpath in lfs:
                        repo.lfs[relpath] = lfs[relpath]
            oid = hashlib.sha1(body + str(time.time_ns()).encode()).hexdigest()
            summary = lines[0]["value"]["summary"]
            if repo is not None:
                repo.sha, repo.commit_title = oid, summary
            hub.commits.append(
                {
                    "repo_id": repo_id,
                    "repo_type": repo_type,
                    "summary": summary,
                    "files": sorted(files),
                    "deleted": sorted(path for path, _ in deleted),
                }
            )
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            self._reply(
                200,
                {
                    "success": True,
                    "commitOid": oid,
                    "commitUrl": f"{hub.endpoint}/{prefix}{repo_id}/commit/{oid}",
                },
            )

        # ------------------------------------------------------------------------------- read routes
        def _entry(self, repo: _Repo, root: Path, target: Path, expand: bool) -> dict:
            relpath = target.relative_to(root).as_posix()
            if target.is_dir():
                tree_id = hashlib.sha1(relpath.encode() + repo.sha.encode()).hexdigest()
                entry = {"type": "directory", "oid": tree_id, "size": 0, "path": relpath}
            else:
                size = target.stat().st_size
                entry = {"type": "file", "oid": hub.blob_id(target), "size": size, "path": relpath}
                if relpath in repo.lfs:
                    entry["lfs"] = {"oid": repo.lfs[relpath], "size": size, "pointerSize": 134}
            if expand:
                entry["lastCommit"] = {
                    "id": repo.sha,
                    "title": repo.commit_title,
                    "date": "2026-01-01T00:00:00.000Z",
                }
            return entry

        def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
            repo = self._readable(repo_type, repo_id)
            if repo is None or not self._revision(repo, revision):
                return
            root = hub.repo_dir(repo_id, repo_type)
            siblings = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            self._reply(
                200,
                {
                    "id": repo_id,
                    "author": repo_id.split("/")[0],
                    "sha": repo.sha,
                    "private": repo.private,
                    "gated": False,
                    "disabled": False,
                    "lastModified": "2026-01-01T00:00:00.000Z",
                    "tags": [],
                    "siblings": [{"rfilename": name} for name in siblings],
                },
            )

        def _tree(
            self, repo_type: str, repo_id: str, revision: str, folder: str, recursive: bool, expand: bool
        ):
            repo = self._readable(repo_type, repo_id)
            if repo is None or not self._revision(repo, revision):
                return
            root = hub.repo_dir(repo_id, repo_type)
            target = root / folder if folder else root
            if not target.is_dir():
                self._error(404, "EntryNotFound", f"{folder} does not exist on main")
                return
            children = sorted(target.rglob("*") if recursive else target.iterdir())
            self._reply(200, [self._entry(repo, root, child, expand) for child in children])

        def _paths_info(self, repo_type: str, repo_id: str, revision: str, paths: list[str], expand: bool):
            repo = self._readable(repo_type, repo_id)
            if repo is None or not self._revision(repo, revision):
                return
            root = hub.repo_dir(repo_id, repo_type)
            found = [root / p.strip("/") for p in paths if (root / p.strip("/")).exists()]
            self._reply(200, [self._entry(repo, root, target, expand) for target in found])

        def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, relpath: str) -> None:
            repo = self._readable(repo_type, repo_id)
            if repo is None or not self._revision(repo, revision):
                return
            target = hub.repo_dir(repo_id, repo_type) / relpath
            if not target.is_file():
                self._error(404, "EntryNotFound", f"{relpath} does not exist on main")
                return
            size = target.stat().st_size
            etag = repo.lfs.get(relpath) or hub.blob_id(target)
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
            requested = self.headers.get("Range")
            status, start, end = 200, 0, size
            if requested:
                match = _RANGE.match(requested.strip())
                first, last = (match.group(1), match.group(2)) if match else ("", "")
                if match and first == "" and last:  # bytes=-N: the last N bytes
                    start, end = max(size - int(last), 0), size
                elif match and first:
                    start, end = int(first), min(int(last) + 1 if last else size, size)
                if not match or start >= size or start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            sent = 0
            if method == "GET":  # only the range is read, in 1 MiB pieces; a client may hang up early
                with open(target, "rb") as handle:
                    handle.seek(start)
                    try:
                        while sent < end - start:
                            piece = handle.read(min(2**20, end - start - sent))
                            self.wfile.write(piece)
                            sent += len(piece)
                    finally:
                        with hub._lock:
                            hub.served.append((method, unquote(urlsplit(self.path).path), requested, sent))
            else:
                with hub._lock:
                    hub.served.append((method, unquote(urlsplit(self.path).path), requested, 0))

    return Handler
