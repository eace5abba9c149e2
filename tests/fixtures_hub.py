"""A Hugging Face Hub on 127.0.0.1: the few routes huggingface_hub's snapshot_download and hf_hub_download call,
over repositories pushed from local folders, so tests fill a real cache through huggingface_hub's own code.

Routes, as the Hub answers them: GET /api/models/{repo}/revision/{rev} (the commit a branch or tag names),
GET /api/models/{repo}/tree/{rev} (the file listing), HEAD and GET /{repo}/resolve/{rev}/{path} (a file, with
X-Repo-Commit and ETag headers). Unknown repositories, revisions and files get the Hub's 404s with their
X-Error-Code, which huggingface_hub turns into RepositoryNotFoundError, RevisionNotFoundError, ...
"""

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest


def git_blob_id(data: bytes) -> str:
    """Return git's object id of a file's bytes, which the Hub gives as a small file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repositories of files at commits, with branches and tags, served over HTTP until `close`."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> commit -> path -> bytes
        self.refs: dict[str, dict[str, str]] = {}  # repo -> branch or tag -> commit
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served
        self.gated: set[str] = set()  # repositories whose terms this (anonymous) user has not accepted
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def push(
        self, repo_id: str, folder: Path, revision: str = "main", extra: dict[str, bytes] | None = None
    ) -> str:
        """Commit the files under `folder` (and `extra` paths) to `revision` of `repo_id`; return the commit."""
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }
        files.update(extra or {})
        digest = hashlib.sha1(repo_id.encode())
        for path, data in sorted(files.items()):
            digest.update(path.encode() + b"\0" + data)
        commit = digest.hexdigest()
        self.commits.setdefault(repo_id, {})[commit] = files
        self.refs.setdefault(repo_id, {})[revision] = commit
        return commit

    def close(self) -> None:
        """Stop serving: the Hub is then unreachable."""
        self._server.shutdown()
        self._server.server_close()

    def _commit(self, repo_id: str, revision: str) -> str | None:
        commits = self.commits.get(repo_id, {})
        return revision if revision in commits else self.refs.get(repo_id, {}).get(revision)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - the http.server API
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self._answer(body=True)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, code: str, body: bool) -> None:
                self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code}, body)

            def _answer(self, body: bool) -> None:
                path = urlsplit(self.path).path
                hub.requests.append((self.command, path))
                parts = path.lstrip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6:  # api/models/{org}/{name}/{kind}/{rev}
                    return self._api(f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5]), body)
                if len(parts) >= 5 and parts[2] == "resolve":  # {org}/{name}/resolve/{rev}/{path}
                    return self._file(
                        f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])), body
                    )
                self._send(404, b"{}", {}, body)  # a route mmlm does not need (e.g. /api/agent-harnesses)

            def _api(self, repo_id: str, kind: str, revision: str, body: bool) -> None:
                if repo_id in hub.gated:
                    return self._send(401, b"{}", {"X-Error-Code": "GatedRepo"}, body)
                if repo_id not in hub.commits:
                    return self._error("RepoNotFound", body)
                commit = hub._commit(repo_id, revision)
                if commit is None:
                    return self._error("RevisionNotFound", body)
                files = hub.commits[repo_id][commit]
                if kind == "revision":
                    info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": p} for p in files]}
                else:
                    info = [
                        {"type": "file", "path": p, "size": len(d), "oid": git_blob_id(d)}
                        for p, d in files.items()
                    ]
                self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

            def _file(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
                if repo_id not in hub.commits:
                    return self._error("RepoNotFound", body)
                commit = hub._commit(repo_id, revision)
                if commit is None:
                    return self._error("RevisionNotFound", body)
                data = hub.commits[repo_id][commit].get(filename)
                if data is None:
                    return self._error("EntryNotFound", body)
                headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"'}
                self._send(200, data, headers, body)

        return Handler


def serve_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """Yield a FakeHub that huggingface_hub talks to, with an empty cache under tmp_path, online (a fixture's
    body: `yield from serve_hub(tmp_path, monkeypatch)`).

    huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import, so this process's copy
    is patched; the environment is set too, for the subprocesses a test starts.
    """
    served = FakeHub()
    cache = tmp_path / "hf-cache"
    settings = {"ENDPOINT": served.url, "HUGGINGFACE_CO_URL_TEMPLATE": served.url + "/{repo_id}/resolve/{revision}/{filename}",
                "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": False,
                "AGENT_HARNESSES_PATH": str(tmp_path / "hf-home" / ".agent_harnesses.json")}  # fmt: skip
    for key, value in settings.items():  # AGENT_HARNESSES_PATH: huggingface_hub >= 2 only
        monkeypatch.setattr(huggingface_hub.constants, key, value, raising=key != "AGENT_HARNESSES_PATH")
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # huggingface_hub's other files, out of ~/.cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    served.cache = cache
    yield served
    served.close()


def go_offline(monkeypatch) -> None:
    """Set HF_HUB_OFFLINE=1, in the environment and in this process's huggingface_hub."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
