"""HTTP stand-ins for the Git export tests.

``GitHttpServer`` is real Git over HTTP: git's own ``git-http-backend`` (CGI) behind a small
threaded server that asks for Basic auth, as GitLab and GitHub do for token logins.
``FakeForge`` answers the two REST endpoints the portal calls to open a merge request, GitLab's
and GitHub's, as their documentation describes them: neither service can run here.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

GIT_HTTP_BACKEND = Path(subprocess.run(["git", "--exec-path"], capture_output=True, text=True,
                                       check=True).stdout.strip()) / "git-http-backend"


class _Server:
    """A ThreadingHTTPServer on a free loopback port, running in a daemon thread."""

    handler: type[BaseHTTPRequestHandler]

    def __enter__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.owner = self
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


class _GitHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def _serve(self):
        server: GitHttpServer = self.server.owner
        expected = base64.b64encode(f"{server.username}:{server.token}".encode()).decode()
        if self.headers.get("Authorization") != f"Basic {expected}":
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        url = urlsplit(self.path)
        if url.query == "service=git-receive-pack":
            server.before_push()
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(server.root), "GIT_HTTP_EXPORT_ALL": "1",
               "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "REQUEST_METHOD": self.command,
               "PATH_INFO": url.path, "QUERY_STRING": url.query, "REMOTE_USER": server.username,
               "REMOTE_ADDR": self.client_address[0], "CONTENT_TYPE": self.headers.get("Content-Type", "")}
        for header in ("Git-Protocol", "Content-Encoding"):
            if header in self.headers:
                env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
        body = self._body()
        if self.command == "POST":
            env["CONTENT_LENGTH"] = str(len(body))
        cgi = subprocess.run([str(GIT_HTTP_BACKEND)], input=body, env=env, capture_output=True, timeout=60, check=False)
        head, _, payload = cgi.stdout.partition(b"\r\n\r\n")
        headers = [line.split(": ", 1) for line in head.decode("latin-1").split("\r\n") if ": " in line]
        status = next((int(value.split()[0]) for name, value in headers if name.lower() == "status"), 200)
        self.send_response(status)
        for name, value in headers:
            if name.lower() != "status":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):  # git streams packs over 1 MiB
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))


class GitHttpServer(_Server):
    """Serves the bare repositories under ``root`` at ``<base_url>/<name>``, for one user and token."""

    handler = _GitHandler

    def __init__(self, root: Path, username: str, token: str):
        self.root, self.username, self.token = root, username, token
        self._race: Callable[[], None] | None = None

    def race_next_push(self, push: Callable[[], None]) -> None:
        """Run ``push`` (another client's push) once, just before the next push is answered."""
        self._race = push

    def before_push(self) -> None:
        push, self._race = self._race, None
        if push is not None:
            push()


class _ForgeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.owner.handle(self, None)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        self.server.owner.handle(self, json.loads(self.rfile.read(length)))


class FakeForge(_Server):
    """GitLab's ``/projects/:id/merge_requests`` or GitHub's ``/repos/:owner/:repo/pulls``.

    Only what the portal uses: create (201 with the web URL), the documented answer when one is
    already open for the branch (GitLab 409, GitHub 422), and listing the open ones by branch.
    Requests without the right token get 401. ``requests`` records (method, path, body).
    """

    handler = _ForgeHandler

    def __init__(self, kind: str, project: str, token: str):
        self.kind, self.project, self.token = kind, project, token
        self.requests: list[tuple[str, str, dict | None]] = []
        self.open: dict[tuple[str, str], str] = {}  # (source branch, target branch) -> web URL

    @property
    def api_url(self) -> str:
        return self.base_url + ("/api/v4" if self.kind == "gitlab" else "")

    def handle(self, request: BaseHTTPRequestHandler, body: dict | None) -> None:
        url = urlsplit(request.path)
        self.requests.append((request.command, url.path, body))
        if self.kind == "gitlab":
            authorized = request.headers.get("PRIVATE-TOKEN") == self.token
            collection = "/api/v4/projects/" + self.project.replace("/", "%2F") + "/merge_requests"
            source, target, url_key, conflict = "source_branch", "target_branch", "web_url", 409
        else:
            authorized = request.headers.get("Authorization") == f"Bearer {self.token}"
            collection = f"/repos/{self.project}/pulls"
            source, target, url_key, conflict = "head", "base", "html_url", 422
        if not authorized:
            return self._answer(request, 401, {"message": "401 Unauthorized"})
        if url.path != collection:
            return self._answer(request, 404, {"message": "404 Not Found"})
        if request.command == "GET":
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            branch = query[source].split(":", 1)[-1]  # GitHub filters by owner:branch
            found = [{url_key: web} for (src, dst), web in self.open.items() if src == branch and dst == query[target]]
            return self._answer(request, 200, found)
        if not body.get("title") or not body.get(source) or not body.get(target):
            return self._answer(request, 400, {"message": "title, source and target are required"})
        key = (body[source], body[target])
        if key in self.open:
            if self.kind == "gitlab":
                answer = {"message": ["Another open merge request already exists for this source branch: !1"]}
            else:
                answer = {"message": "Validation Failed", "errors": [
                    {"resource": "PullRequest", "code": "custom",
                     "message": f"A pull request already exists for {self.project.split('/')[0]}:{body[source]}."}]}
            return self._answer(request, conflict, answer)
        self.open[key] = f"{self.base_url}/{self.project}/change/{len(self.open) + 1}"
        return self._answer(request, 201, {url_key: self.open[key]})

    @staticmethod
    def _answer(request: BaseHTTPRequestHandler, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
