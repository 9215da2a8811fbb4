"""A loopback stand-in for the Hugging Face Hub: the few routes ``create_repo`` + ``upload_folder`` use.

Tests point the real ``huggingface_hub`` client at it (``HF_ENDPOINT=http://127.0.0.1:PORT`` or
``HfApi(endpoint=...)``) and look at the files that arrive in ``LocalHub.repo_dir(repo_id)``. Routes:

- ``GET  /api/whoami-v2``                                   token check (401 for a wrong token)
- ``POST /api/repos/create``                                ``{"url": ...}``; 409 when the repo exists
- ``POST /api/validate-yaml``                               README metadata must be a YAML mapping
- ``POST /api/models/{repo}/preupload/{rev}``               upload mode per file: ``lfs`` for paths matching
                                                            ``lfs_patterns`` (non-empty files), else ``regular``
- ``POST /{repo}.git/info/lfs/objects/batch``               LFS batch API, "basic" transfer to the two routes below
- ``PUT  /lfs-objects/{oid}``, ``POST /lfs-verify/{oid}``   store a blob (sha256-checked), verify it
- ``POST /api/models/{repo}/commit/{rev}``                  NDJSON commit: base64 ``file`` and ``lfsFile`` lines

Every request is recorded in ``requests`` as ``(method, path)``; anything else is answered 404 and recorded in
``unexpected``. Xet storage is not implemented: with ``hf_xet`` installed the client only needs it for files
the server marks ``lfs``, so tests either keep ``lfs_patterns`` empty or set ``HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml


class LocalHub:
    """Serve on ``127.0.0.1`` (random port) from a thread; use as a context manager."""

    def __init__(self, root: str | Path, token: str = "hf_test_token", lfs_patterns: tuple[str, ...] = ()):
        self.root = Path(root)
        self.token = token
        self.lfs_patterns = lfs_patterns
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def blob_path(self, oid: str) -> Path:
        return self.root / "lfs" / oid

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
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

        def _reply(self, status: int, payload: dict | None = None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            body = self._body()
            with hub._lock:
                hub.requests.append((method, path))
            parts = path.strip("/").split("/")
            if method == "GET" and path == "/api/whoami-v2":
                if self._authorised():
                    self._reply(200, {"type": "user", "name": "tester", "auth": {"type": "access_token"}})
            elif method == "POST" and path == "/api/repos/create":
                if self._authorised():
                    self._create_repo(json.loads(body))
            elif method == "POST" and path == "/api/validate-yaml":
                self._validate_yaml(json.loads(body))
            elif (
                method == "POST"
                and len(parts) == 6
                and parts[:2] == ["api", "models"]
                and parts[4] == "preupload"
            ):
                if self._authorised():
                    self._preupload(f"{parts[2]}/{parts[3]}", json.loads(body))
            elif (
                method == "POST"
                and len(parts) == 6
                and parts[:2] == ["api", "models"]
                and parts[4] == "commit"
            ):
                if self._authorised():
                    self._commit(f"{parts[2]}/{parts[3]}", body)
            elif method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                if self._authorised():
                    self._lfs_batch(json.loads(body))
            elif method == "PUT" and len(parts) == 2 and parts[0] == "lfs-objects":
                self._lfs_store(parts[1], body)
            elif method == "POST" and len(parts) == 2 and parts[0] == "lfs-verify":
                exists = hub.blob_path(parts[1]).is_file()
                self._reply(200 if exists else 404, {} if exists else {"error": "object not found"})
            else:
                with hub._lock:
                    hub.unexpected.append((method, path))
                self._reply(404, {"error": f"no route {method} {path} in the test hub"})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        # ---------------------------------------------------------------------------------- routes
        def _create_repo(self, payload: dict) -> None:
            repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
            url = f"{hub.endpoint}/{repo_id}"
            if hub.repo_dir(repo_id).exists():
                self._reply(409, {"error": "You already created this model repo", "url": url})
                return
            hub.repo_dir(repo_id).mkdir(parents=True)
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

        def _preupload(self, repo_id: str, payload: dict) -> None:
            if not hub.repo_dir(repo_id).is_dir():
                self._reply(404, {"error": "Repository not found"})
                return
            files = []
            for item in payload["files"]:
                lfs = item["size"] > 0 and any(fnmatch.fnmatch(item["path"], p) for p in hub.lfs_patterns)
                files.append(
                    {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                )
            self._reply(200, {"files": files, "commitOid": "0" * 40})

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

        def _commit(self, repo_id: str, body: bytes) -> None:
            if self.headers.get("Content-Type") != "application/x-ndjson":
                self._reply(400, {"error": "commit payload must be application/x-ndjson"})
                return
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                self._reply(400, {"error": "the first NDJSON line must be the commit header"})
                return
            files: dict[str, bytes] = {}
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
                else:
                    self._reply(400, {"error": f"unsupported commit operation {line['key']!r}"})
                    return
            for relpath, data in files.items():
                target = hub.repo_dir(repo_id) / relpath
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            oid = hashlib.sha1(body).hexdigest()
            hub.commits.append(
                {"repo_id": repo_id, "summary": lines[0]["value"]["summary"], "files": sorted(files)}
            )
            self._reply(
                200,
                {"success": True, "commitOid": oid, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}"},
            )

    return Handler
