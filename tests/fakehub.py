"""A local stand-in for the Hugging Face Hub, for tests that must never touch the network.

It serves a folder of repos (`root/owner/name/...`) on 127.0.0.1 with just the endpoints that
huggingface_hub calls to download (read from its source, huggingface_hub 2.4):
- GET  /api/models/{repo}/revision/{rev}   model info with the repo's files ("siblings");
- GET  /api/models/{repo}/tree/{rev}       the recursive file listing snapshot_download reads;
- HEAD /{repo}/resolve/{rev}/{path}        metadata: X-Repo-Commit, ETag, and for LFS files
                                           X-Linked-Etag (the sha256) and X-Linked-Size;
- GET  /{repo}/resolve/{rev}/{path}        the bytes, honouring `Range: bytes=N-`.
Errors are 404s (403 for gated repos) with the X-Error-Code huggingface_hub maps to its
exceptions: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo.

Faults for tests: `drop_once` (paths whose first GET sends half the body, then closes the
connection), `corrupt` (paths served with wrong bytes of the right length), `gated` (repos).
Every request is recorded in `requests` as (method, url path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Files stored with Git LFS on the real Hub (its default .gitattributes covers these).
LFS_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """`with FakeHub(root) as hub:` serves `root` at `hub.url` until the block ends."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.drop_once: set[str] = set()  # "owner/name/path/in/repo"
        self.corrupt: set[str] = set()
        self.gated: set[str] = set()  # "owner/name"
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- content -------------------------------------------------------------------------------
    def add(self, repo: str, path: str, data: bytes) -> None:
        file = self.root / repo / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)

    def files(self, repo: str) -> dict[str, Path]:
        folder = self.root / repo
        return {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }

    def commit(self, repo: str) -> str:
        h = hashlib.sha1()
        for path, file in self.files(repo).items():
            h.update(path.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
        return h.hexdigest()

    def served(self, method: str = "GET") -> list[str]:
        """The url paths requested with `method`, in order."""
        return [path for m, path, _ in self.requests if m == method]

    def _record(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((method, path, range_header))

    def _take_drop(self, key: str) -> bool:
        with self._lock:
            if key in self.drop_once:
                self.drop_once.discard(key)
                return True
            return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # Clients dropping idle keep-alive connections at exit are normal, not test failures.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._dispatch(body=False)

        def do_GET(self) -> None:
            self._dispatch(body=True)

        # -- routing ---------------------------------------------------------------------------
        def _dispatch(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub._record(self.command, path, self.headers.get("Range"))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                self._api(f"{parts[2]}/{parts[3]}", parts[4], parts[5])
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
            else:
                self._error(404, "RepoNotFound", "not a route of this fake hub")

        def _repo_and_commit(self, repo: str, revision: str) -> str | None:
            if not (hub.root / repo).is_dir():
                self._error(404, "RepoNotFound", f"Repository {repo} not found")
                return None
            commit = hub.commit(repo)
            if revision not in ("main", commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return commit

        # -- api -------------------------------------------------------------------------------
        def _api(self, repo: str, what: str, revision: str) -> None:
            commit = self._repo_and_commit(repo, revision)
            if commit is None:
                return
            files = hub.files(repo)
            if what == "revision":
                siblings = [{"rfilename": p} for p in files]
                self._json({"id": repo, "sha": commit, "siblings": siblings, "private": False})
            elif what == "tree":
                self._json([_tree_entry(p, f.read_bytes()) for p, f in files.items()])
            else:
                self._error(404, "RepoNotFound", f"unknown api {what}")

        def _json(self, value: object) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        # -- files -----------------------------------------------------------------------------
        def _resolve(self, repo: str, revision: str, path: str, body: bool) -> None:
            commit = self._repo_and_commit(repo, revision)
            if commit is None:
                return
            if repo in hub.gated:
                self._error(403, "GatedRepo", "Access to model is restricted", commit)
                return
            file = hub.files(repo).get(path)
            if file is None:
                self._error(404, "EntryNotFound", f"{path} does not exist", commit)
                return
            data = file.read_bytes()
            headers = _file_headers(path, data, commit)
            if body and f"{repo}/{path}" in hub.corrupt:
                data = bytes(b ^ 0xFF for b in data)
            start = _range_start(self.headers.get("Range")) if body else 0
            self._send_file(headers, data, start, body, f"{repo}/{path}")

        def _send_file(self, headers: dict, data: bytes, start: int, body: bool, key: str) -> None:
            self.send_response(206 if start else 200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if hub._take_drop(key):  # half the promised bytes, then a dead connection
                self.wfile.write(data[start : start + (len(data) - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data[start:])

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            data = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _is_lfs(path: str) -> bool:
    return path.lower().endswith(LFS_SUFFIXES)


def _file_headers(path: str, data: bytes, commit: str) -> dict[str, str]:
    headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
    if _is_lfs(path):
        sha = hashlib.sha256(data).hexdigest()
        headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"'})
        headers["X-Linked-Size"] = str(len(data))
    else:
        headers["ETag"] = f'"{git_sha1(data)}"'
    return headers


def _tree_entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
    if _is_lfs(path):
        sha = hashlib.sha256(data).hexdigest()
        entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
    return entry


def _range_start(value: str | None) -> int:
    if not value or not value.startswith("bytes="):
        return 0
    return int(value[len("bytes=") :].split("-")[0] or 0)
