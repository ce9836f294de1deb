"""A loopback stand-in for the Hugging Face Hub's upload API, for tests: it creates repos, answers preupload with
"regular" (files inline in the commit, no LFS or Xet storage) and records every request and committed file."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RecordingHub:
    """`with RecordingHub() as hub:` point HF_ENDPOINT at `hub.url`; then `hub.requests` (method, path,
    authorization) and `hub.files` ({repo: {path: bytes}}) hold what a client sent."""

    def __init__(self, fail_commits: bool = False):
        self.fail_commits = fail_commits  # answer every commit with a 500, as a Hub outage would
        self.requests: list[tuple[str, str, str | None]] = []
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, code: int, data: dict) -> None:
                raw = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self._reply(404, {"error": "not found"})

            def do_POST(self):
                body = self._body()
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path, self.headers.get("Authorization")))
                if path == "/api/validate-yaml":  # the client sends README.md's text before uploading it
                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    try:
                        from huggingface_hub import ModelCard

                        ModelCard(content, ignore_metadata_errors=False)
                    except Exception as exc:
                        return self._reply(400, {"errors": [{"message": str(exc)}]})
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data.get('organization') or 'user'}/{data['name']}" if "/" not in data["name"] else data["name"]
                    hub.files.setdefault(repo, {})
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                m = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/(.+)", path)
                if m and m.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False, "oid": None} for f in files]})
                if m and m.group(2) == "commit" and hub.fail_commits:
                    return self._reply(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
                if m and m.group(2) == "commit":
                    repo = m.group(1)
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    hub.commits.append({"repo": repo, "revision": m.group(3), "lines": lines})
                    for item in lines:
                        if item["key"] == "file":
                            hub.files.setdefault(repo, {})[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._reply(200, {"success": True, "commitOid": "0" * 40, "pullRequestUrl": None,
                                             "commitUrl": f"{hub.url}/{repo}/commit/{'0' * 40}"})
                self._reply(404, {"error": "not found"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
