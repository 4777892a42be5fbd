"""A local Hugging Face hub: the HTTP endpoints huggingface_hub 2.x calls to download a model.

No hub is reachable from the machines that test tbmesh, so tests point HF_ENDPOINT at this
server and run the real library against it. It serves, for repositories made from local
directories, what huggingface_hub's snapshot_download and model_info read (see
huggingface_hub/_snapshot_download.py, file_download.py, hf_api.py, utils/_http.py):

- GET /api/models/{repo}[/revision/{rev}][?blobs=True]: the commit (`sha`) and `siblings`
  (with `blobs`: size, blobId and LFS sha256 of each file).
- GET /api/models/{repo}/tree/{rev}?recursive=True: the file list snapshot_download filters
  with allow_patterns (type, path, size, oid, lfs {oid, size, pointerSize}).
- HEAD and GET /{repo}/resolve/{rev}/{file}: a small file is answered here with ETag (its git
  blob sha1), X-Repo-Commit and Content-Length. A weight file (LFS, as the hub stores
  *.safetensors) gets the hub's 302 to a CDN on another origin, with X-Linked-Etag (its
  sha256), X-Linked-Size and X-Repo-Commit: the library takes its metadata from that redirect
  and fetches the CDN address without following it further.
- GET /cdn/{sha256} on the CDN's own port, with Range (a download cut mid-file is resumed
  with `Range: bytes=N-`).
- GET /api/agent-harnesses: the registry of AI agents the library names in its User-Agent.
- Errors as the hub gives them: X-Error-Code RepoNotFound (401, as to an anonymous client),
  RevisionNotFound and EntryNotFound (404), GatedRepo (401 without the repository's token).

It counts the GETs of each file's bytes, and can stall a file (send half of it and wait) or
cut a connection mid-file, to test interrupted and resumed pulls.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

LFS = re.compile(r".*\.safetensors$")  # stored in LFS on the hub (its .gitattributes)


@dataclass
class RepoFile:
    data: bytes
    blob_id: str  # git's sha1 of the blob (the ETag of a file not in LFS)
    sha256: str | None  # LFS files: the content's sha256 (their ETag)


@dataclass
class Repo:
    files: dict[str, RepoFile]
    commit: str
    token: str | None = None  # gated: only this token may download


@dataclass
class Requests:
    gets: Counter[str] = field(default_factory=Counter)  # file -> GETs of its bytes
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (file, Range header)
    log: list[tuple[str, str]] = field(default_factory=list)  # (method, path)


class Hub:
    """The hub (HF_ENDPOINT = hub.url) and its CDN, each on its own port of 127.0.0.1."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests = Requests()
        self.stall: set[str] = set()  # files whose GET sends half and waits for `release`
        self.release = threading.Event()
        self.stalled = threading.Event()  # set when a stalled GET has sent its half
        self.cut_once: dict[str, int] = {}  # file -> bytes its next GET sends before closing
        self._lock = threading.Lock()
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn)) for cdn in (False, True)]
        for server in self._servers:
            server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._servers[0].server_port}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_port}"

    def add(self, repo: str, directory: Path, token: str | None = None) -> str:
        """Serve the files under `directory` as `repo`'s main branch; returns its commit."""
        files = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            data = path.read_bytes()
            name = path.relative_to(directory).as_posix()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            files[name] = RepoFile(data, blob, hashlib.sha256(data).hexdigest() if LFS.match(name) else None)
        commit = hashlib.sha1(json.dumps({n: f.blob_id for n, f in files.items()}).encode()).hexdigest()
        self.repos[repo] = Repo(files, commit, token)
        return commit

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = Requests()

    def count(self, method: str, path: str, file: str | None = None, range_: str | None = None) -> None:
        with self._lock:
            self.requests.log.append((method, path))
            if file is not None:
                self.requests.gets[file] += 1
                if range_:
                    self.requests.ranges.append((file, range_))

    def __enter__(self) -> Self:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()


def _handler(hub: Hub, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of the hub

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            if cdn:
                return self._cdn(path, head)
            hub.count(self.command, self.path)
            if path == "/api/agent-harnesses":  # for the User-Agent, once a day (cached in HF_HOME)
                return self._json({"standardEnvVars": ["AI_AGENT", "AGENT"], "harnesses": {}})
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                return self._info(m[1], m[2] or "main", "blobs" in query)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                return self._tree(m[1], m[2], m[3] or "")
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m[1], m[2], m[3], head)
            self._error(404, None, "Not Found")

        def _repo(self, name: str, revision: str) -> Repo | None:
            repo = hub.repos.get(name)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
            elif revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            else:
                return repo
            return None

        def _info(self, name: str, revision: str, blobs: bool) -> None:
            if (repo := self._repo(name, revision)) is None:
                return
            siblings = []
            for path, file in repo.files.items():
                sibling: dict = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(file.data), blobId=file.blob_id)
                    if file.sha256:
                        sibling["lfs"] = {"size": len(file.data), "sha256": file.sha256, "pointerSize": 134}
                siblings.append(sibling)
            self._json({"_id": "0" * 24, "id": name, "sha": repo.commit, "private": False,
                        "gated": "manual" if repo.token else False, "disabled": False,
                        "library_name": "mlx", "tags": ["mlx"], "siblings": siblings})  # fmt: skip

        def _tree(self, name: str, revision: str, under: str) -> None:
            if (repo := self._repo(name, revision)) is None:
                return
            entries = []
            for path, file in repo.files.items():
                if under and not path.startswith(under.rstrip("/") + "/"):
                    continue
                entry: dict = {"type": "file", "oid": file.blob_id, "size": len(file.data), "path": path}
                if file.sha256:
                    entry["lfs"] = {"oid": file.sha256, "size": len(file.data), "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, name: str, revision: str, path: str, head: bool) -> None:
            if (repo := self._repo(name, revision)) is None:
                return
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self._error(401, "GatedRepo", f"Access to model {name} is restricted.")
            file = repo.files.get(path)
            if file is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", repo.commit)
            common = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
            if file.sha256:  # LFS: the hub sends the client to its CDN with a signed URL
                self._send(302, {**common, "Location": f"{hub.cdn_url}/cdn/{file.sha256}?signed=1",
                                 "ETag": f'"{file.blob_id}"', "X-Linked-Etag": f'"{file.sha256}"',
                                 "X-Linked-Size": str(len(file.data)), "Content-Length": "0"})  # fmt: skip
                return
            self._body(path, file.data, {**common, "ETag": f'"{file.blob_id}"'}, head)

        def _cdn(self, path: str, head: bool) -> None:
            sha = path.removeprefix("/cdn/")
            for repo in hub.repos.values():
                for name, file in repo.files.items():
                    if file.sha256 == sha:
                        hub.count(self.command, self.path)
                        return self._body(name, file.data, {"ETag": f'"{sha}"'}, head)
            self._error(404, None, "Not Found")

        def _body(self, name: str, data: bytes, headers: dict[str, str], head: bool) -> None:
            """The file, or from a `Range: bytes=N-` on, as a web server sends it."""
            status, start = 200, 0
            wanted = self.headers.get("Range")
            if wanted and (m := re.fullmatch(r"bytes=(\d+)-", wanted)) and int(m[1]) < len(data):
                status, start = 206, int(m[1])
                headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            self._send(status, {**headers, "Content-Length": str(len(data) - start),
                                "Content-Type": "application/octet-stream"})  # fmt: skip
            if head:
                return
            hub.count("DATA", self.path, name, wanted)
            body = data[start:]
            if name in hub.stall:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                hub.stalled.set()
                hub.release.wait()
                self.close_connection = True
                return
            if (cut := hub.cut_once.pop(name, None)) is not None:
                self.wfile.write(body[:cut])
                self.close_connection = True
                return
            self.wfile.write(body)

        def _json(self, data: object) -> None:
            body = json.dumps(data).encode()
            self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
            self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers)
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()

    return Handler
