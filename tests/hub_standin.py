"""A loopback stand-in for the Hub endpoints huggingface_hub calls to create a repo and upload a folder.

Point HF_ENDPOINT at `HubStandIn.url`. Every file is answered as a "regular" upload (its bytes travel
base64-encoded inside the commit), so no LFS or Xet transfer ever starts; an `lfsFile` line in a
commit is refused. `before_commit`, when set, is called as a commit arrives, which then gets no answer
(a client that dies mid-push). Requests without the expected token get 401; anything else gets 404 and is listed
in `unserved` (huggingface_hub 2.x asks for /api/agent-harnesses and carries on without it). What
arrived is kept for the test: repos (private flag, branches, each branch's files) and commits
(revision, message, files).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def pushing_env(tmp_path, **overrides: str) -> dict[str, str]:
    """The environment of a process that pushes to the stand-in: this one's, without HF_HUB_OFFLINE (offline
    clusters set it, and huggingface_hub then refuses to connect), with its own HF_HOME and loopback unproxied."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {**env, "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1", **overrides}


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


@dataclass
class Commit:
    repo: str
    revision: str
    summary: str
    files: dict[str, bytes]


class HubStandIn:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.requests: list[str] = []  # "METHOD /path", in order
        self.unserved: list[str] = []  # requests answered 404
        self.before_commit = None  # called as a commit arrives, which then gets no answer (a client that dies)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                standin._handle(self)

            def do_GET(self):
                standin._handle(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -------------------------------------------------------------------------------------------- routes

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        self.requests.append(f"{h.command} {path}")
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(h, 401, {"error": "Invalid credentials in Authorization header"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^/]+)", path)
        if h.command == "POST" and path == "/api/repos/create":
            return self._create(h, json.loads(body))
        if h.command == "POST" and path == "/api/validate-yaml":  # huggingface_hub without hf_xet checks README.md
            return self._reply(h, 200, {"errors": [], "warnings": []})
        if h.command == "POST" and m and m.group(1) in self.repos:
            repo, action, revision = m.group(1), m.group(2), m.group(3)
            if action == "commit" and self.before_commit is not None:
                return self.before_commit()
            return getattr(self, f"_{action}")(h, self.repos[repo], repo, revision, body)
        self.unserved.append(f"{h.command} {path}")
        return self._reply(h, 404, {"error": f"the stand-in does not serve {h.command} {path}"})

    def _create(self, h, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            return self._reply(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        # huggingface_hub 2.x sends `visibility`, 1.x `private`
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._reply(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _branch(self, h, repo: Repo, repo_id: str, branch: str, body: bytes) -> None:
        if branch in repo.branches:
            return self._reply(h, 409, {"error": f"branch {branch} already exists"})
        repo.branches[branch] = dict(repo.branches["main"])
        self._reply(h, 200, {})

    def _preupload(self, h, repo: Repo, repo_id: str, revision: str, body: bytes) -> None:
        files = json.loads(body)["files"]
        self._reply(
            h,
            200,
            {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                ]
            },
        )

    def _commit(self, h, repo: Repo, repo_id: str, revision: str, body: bytes) -> None:
        if revision not in repo.branches:
            return self._reply(h, 404, {"error": f"Invalid rev id: {revision}"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = {}
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                return self._reply(h, 400, {"error": f"the stand-in takes regular files only, not {line['key']}"})
        repo.branches[revision].update(files)
        self.commits.append(Commit(repo_id, revision, header["summary"], files))
        oid = hashlib.sha1(body).hexdigest()
        self._reply(
            h, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status >= 400:
            h.send_header("X-Error-Message", payload["error"])
        h.end_headers()
        h.wfile.write(data)
