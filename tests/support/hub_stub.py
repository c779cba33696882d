"""A tiny in-memory stand-in for the Hugging Face Hub HTTP API, for offline tests.

`HubStub` starts a `http.server.ThreadingHTTPServer` on 127.0.0.1 (free port, daemon thread).
Point a process at it with `HF_ENDPOINT=stub.endpoint` *before* `huggingface_hub` is imported
(the endpoint is read once, at import time, into `huggingface_hub.constants.ENDPOINT`), plus any
`HF_TOKEN`. Then the following calls work against it:

- `HfApi().create_repo(repo_id, exist_ok=True)` (also with `private=...`, `repo_type=...`)
- `HfApi().upload_folder(...)` / `upload_file(...)` / `create_commit(...)`, including
  `path_in_repo`, `allow_patterns`/`ignore_patterns`, `run_as_future=True` and re-uploads of
  unchanged files (which the client turns into a no-op and answers from `repo_info`);
  both the legacy `create_commit` path and the pipelined `upload_folder` (used by huggingface_hub
  2.4.0 whenever `hf_xet` is installed and `HF_HUB_DISABLE_XET` is unset) work, because every file is declared "regular" (see below)
- `HfApi().repo_info` / `model_info` / `dataset_info` / `repo_exists` / `revision_exists`
- `HfApi().whoami()`
- `transformers.Trainer` with `push_to_hub=True`: `init_hf_repo`, `push_to_hub`,
  `_push_from_checkpoint` and `create_model_card` (README.md metadata is checked by the
  `/api/validate-yaml` route, which here only checks that the front matter is a YAML mapping).

Routes emulated (`{type}` is `models`, `datasets` or `spaces`; `{rev}` is URL-quoted):

    GET  /api/whoami-v2
    GET  /api/agent-harnesses    (telemetry, see below: always 404, not recorded as unhandled)
    GET  /api/organizations/{org}/overview   (always 404: no organizations; not recorded as unhandled)
    POST /api/repos/create
    POST /api/validate-yaml
    GET  /api/{type}/{namespace}/{name}                     (repo info)
    GET  /api/{type}/{namespace}/{name}/revision/{rev}      (repo info at a revision)
    POST /api/{type}/{namespace}/{name}/preupload/{rev}
    POST /api/{type}/{namespace}/{name}/commit/{rev}         (ndjson payload)

The key simplification: the preupload route answers `"uploadMode": "regular"` for every file,
whatever its size or content. The client then sends every file base64-encoded inside the
ndjson commit payload, so neither the git-LFS batch API nor the Xet storage protocol (CAS
server, xet tokens) is needed. The real Hub would ask for LFS/Xet for large or binary files.

Not emulated (such requests get a 404 JSON error and are recorded in `HubStub.unhandled`, so a
test can print them): downloads (`/{repo}/resolve/...`, `hf_hub_download`, `snapshot_download`),
tree/file listings, LFS and Xet uploads, branches and tags other than `main` (`create_branch`;
commits to another revision fail with `RevisionNotFound`, like a missing branch on the Hub; reads
accept `main` or a commit oid), pull requests (`create_pr=True`), copies of LFS files, deletions of repos, Spaces
runtime, collections, discussions, and anything else. Also not emulated: `.gitignore` rules sent
with preupload, repo privacy (stored, never enforced), real git object ids for commits, and the
`.gitattributes` file the Hub adds in a new repo's initial commit (the stub's initial commit
is empty).

Telemetry: unless `HF_HUB_DISABLE_TELEMETRY=1`, huggingface_hub 2.4.0 fetches
`/api/agent-harnesses` (best effort, to tag the user-agent) before its first request, and caches
the answer for a day in `$HF_HOME/.agent_harnesses.json`. The stub answers 404 on purpose, so
that nothing gets cached from it; set `HF_HUB_DISABLE_TELEMETRY=1` (and a temporary `HF_HOME`)
to skip the request.

Organizations: online, importing a model of transformers 5.25 probes the Hub's flash-attention kernels,
and the `kernels` package asks `/api/organizations/kernels-community/overview` whether their publisher is
trusted. The stub has no organizations and answers 404 (no kernel is then used), as the Hub answers for an
unknown one; it is not recorded as unhandled.

Auth: write routes (create, preupload, commit) and whoami require an `Authorization: Bearer ...`
header, like the Hub; any token is accepted unless `HubStub(token=...)` is given.

Example::

    with HubStub() as stub:
        env = {**os.environ, "HF_ENDPOINT": stub.endpoint, "HF_TOKEN": "hf_dummy"}
        subprocess.run([sys.executable, "push.py"], env=env, check=True)
        assert stub.files("user/tiny")["model.safetensors"] == local_bytes, stub.unhandled
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


DEFAULT_BRANCH = "main"

# URL segment -> `repo_type` as used by huggingface_hub (and in `POST /api/repos/create` payloads).
_URL_TO_REPO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
# Prefix of a repo's web URL, e.g. "https://huggingface.co/datasets/user/name".
_REPO_TYPE_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Same pattern as `huggingface_hub.repocard.REGEX_YAML_BLOCK`: front matter of a README.md.
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")

_REPO = r"(?P<type>models|datasets|spaces)/(?P<repo_id>[^/]+/[^/]+)"
# (method, path regex, name of the `_Handler` method); paths are matched with `re.fullmatch`.
_ROUTES = [
    ("GET", r"/api/whoami-v2", "_whoami"),
    ("GET", r"/api/agent-harnesses", "_agent_harnesses"),
    ("GET", r"/api/organizations/(?P<organization>[^/]+)/overview", "_organization_overview"),
    ("POST", r"/api/repos/create", "_create_repo"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("GET", rf"/api/{_REPO}(?:/revision/(?P<revision>[^/]+))?", "_repo_info"),
    ("POST", rf"/api/{_REPO}/preupload/(?P<revision>[^/]+)", "_preupload"),
    ("POST", rf"/api/{_REPO}/commit/(?P<revision>[^/]+)", "_commit"),
]


def git_blob_sha1(content: bytes) -> str:
    """Git object id of a blob: what the Hub returns as `oid` for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    """Timestamp in the Hub's format ('%Y-%m-%dT%H:%M:%S.%fZ', milliseconds)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass
class Commit:
    """One commit on the `main` branch, with a full snapshot of the files after it."""

    oid: str
    message: str
    description: str
    files: dict[str, bytes]
    created_at: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    history: list[Commit] = field(default_factory=list)  # oldest first; history[-1] is the head
    created_at: str = field(default_factory=_now)

    @property
    def head(self) -> Commit:
        return self.history[-1]

    def commit_at(self, revision: str) -> Commit | None:
        """Resolve `main` or a (possibly abbreviated, >= 7 chars) commit oid, else None."""
        if revision == DEFAULT_BRANCH:
            return self.head
        if len(revision) >= 7:
            for commit in reversed(self.history):
                if commit.oid.startswith(revision):
                    return commit
        return None


class HubError(Exception):
    """An error answered the way the Hub does: JSON `{"error": ...}` plus `X-Error-*` headers.

    `huggingface_hub.utils.hf_raise_for_status` maps `X-Error-Code` to exception classes
    (`RepoNotFound` -> `RepositoryNotFoundError`, `RevisionNotFound` -> `RevisionNotFoundError`, ...).
    """

    def __init__(self, status: int, message: str, error_code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra  # additional JSON fields, e.g. `url` in the 409 of create_repo


class HubStub:
    """In-memory fake of the Hub API; use as a context manager (see module docstring).

    Args:
        username: namespace of the fake user (returned by whoami, used for `create_repo("name")`).
        token: if given, write routes only accept `Authorization: Bearer <token>`; otherwise any
            bearer token is accepted (a missing one is still refused).
    """

    def __init__(self, username: str = "user", token: str | None = None):
        self.username = username
        self.token = token
        self.endpoint = ""  # set by start()
        self.unhandled: list[str] = []  # "METHOD /path?query (reason)" of every request not emulated
        self.requests: list[str] = []  # "METHOD /path?query -> status" of every request, in order
        self._repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> Repo
        self._lock = threading.RLock()  # guards the state above (handlers run in threads); reentrant
        self._oid_counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> "HubStub":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.stub = self  # type: ignore[attr-defined]  # reachable from handlers as self.server.stub
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, name="hub-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> "HubStub":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # ----------------------------------------------------------------------- inspection (for tests)

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        """Ids of the repos of `repo_type` created so far."""
        with self._lock:
            return sorted(repo_id for kind, repo_id in self._repos if kind == repo_type)

    def files(self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """Files of a repo at `revision` (`main` or a commit oid): `{path_in_repo: content}`."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            commit = repo.commit_at(revision)
            if commit is None:
                raise KeyError(f"no revision {revision!r} in {repo_type} repo {repo_id!r}")
            return dict(commit.files)

    def commits(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Commit messages (summaries) of a repo, oldest first; the first is "initial commit"."""
        with self._lock:
            return [commit.message for commit in self._get_repo(repo_type, repo_id).history]

    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r}; created: {sorted(self._repos)}") from None

    # ----------------------------------------------------------------------- state changes (locked)

    def _new_oid(self, *parts: str) -> str:
        """A unique 40-hex commit id (not a real git commit hash)."""
        data = "\n".join([*parts, str(next(self._oid_counter))]).encode()
        return hashlib.sha1(data).hexdigest()

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{_REPO_TYPE_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _lookup(self, url_type: str, repo_id: str, revision: str | None = None) -> tuple[Repo, Commit]:
        repo = self._repos.get((_URL_TO_REPO_TYPE[url_type], repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        commit = repo.commit_at(unquote(revision or DEFAULT_BRANCH))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return repo, commit


class _Handler(BaseHTTPRequestHandler):
    """Routes each request to one `_<route>` method, which returns a JSON-able body or raises HubError."""

    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has Content-Length
    server_version = "HubStub/0.1"

    # ----------------------------------------------------------------------- plumbing

    @property
    def stub(self) -> HubStub:
        return self.server.stub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; see `HubStub.requests` instead

    def _read_body(self) -> bytes:
        # Always consume the body, even for unknown routes, so the keep-alive connection stays usable.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()  # CRLF after each chunk (and after the final 0-size chunk)
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        self.body = self._read_body()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        status, payload, headers = 404, None, {}
        try:
            for method, pattern, handler_name in _ROUTES:
                match = re.fullmatch(pattern, url.path)
                if match and self.command == method:
                    status, payload = 200, getattr(self, handler_name)(**match.groupdict())
                    break
            else:
                raise self._unhandled("no such route in HubStub")
        except HubError as err:
            status, payload = err.status, {"error": err.message, **err.extra}
            # One line of ASCII: a raw YAML error message, say, would break the HTTP header block.
            one_line = " ".join(err.message.split()).encode("ascii", "replace").decode()
            headers = {"X-Error-Message": one_line}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
        except Exception as err:  # a bug in the stub: answer 500 rather than hang the client
            status, payload = 500, {"error": f"HubStub internal error: {err!r}"}
            with self.stub._lock:
                self.stub.unhandled.append(f"{self.command} {self.path} (internal error: {err!r})")
        with self.stub._lock:
            self.stub.requests.append(f"{self.command} {self.path} -> {status}")
        self._send_json(status, payload, headers)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from None

    def _unhandled(self, reason: str) -> HubError:
        """Record a request the stub does not emulate; returns the 404 to raise."""
        with self.stub._lock:
            self.stub.unhandled.append(f"{self.command} {self.path} ({reason})")
        return HubError(404, f"Not emulated by HubStub: {self.command} {self.path} ({reason})")

    def _require_auth(self) -> None:
        """Write routes and whoami need a bearer token, like on the Hub."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise HubError(401, "Invalid username or password.")
        if self.stub.token is not None and auth != f"Bearer {self.stub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    # ----------------------------------------------------------------------- routes

    def _whoami(self) -> dict:
        self._require_auth()
        return {
            "type": "user",
            "id": "0" * 24,
            "name": self.stub.username,
            "fullname": self.stub.username,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hub-stub", "role": "write"}},
        }

    def _agent_harnesses(self) -> dict:
        """Best-effort telemetry fetch (AI agent registry): a known 404, so not in `unhandled`."""
        raise HubError(404, "Not emulated by HubStub: agent harnesses registry (telemetry)")

    def _organization_overview(self, organization: str) -> dict:
        """`HfApi.get_organization_overview`: the stub has users only, so every organization is unknown."""
        raise HubError(404, f"Organization {organization!r} not found (HubStub has no organizations)")

    def _create_repo(self) -> dict:
        """`HfApi.create_repo`: payload {"name", "organization", "type"?, "visibility"?/"private"?}."""
        self._require_auth()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPE_URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or self.stub.username}/{payload['name']}"
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        with self.stub._lock:
            repo = self.stub._repos.get((repo_type, repo_id))
            if repo is not None:
                # `create_repo(exist_ok=True)` swallows the 409 but still reads `url` from the body.
                raise HubError(409, f"You already created this {repo_type} repo", url=self.stub._repo_url(repo))
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            repo.history.append(Commit(self.stub._new_oid(repo_id), "initial commit", "", {}))
            self.stub._repos[(repo_type, repo_id)] = repo
            return {"url": self.stub._repo_url(repo), "name": repo_id, "id": repo_id}

    def _validate_yaml(self) -> dict:
        """README.md check done by the client before uploading: front matter must be a YAML mapping."""
        content = self._json_body().get("content", "")
        match = _YAML_BLOCK.match(content)
        if match is None or not match.group(2).strip():
            return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(match.group(2))
        except yaml.YAMLError as err:
            metadata, message = None, f"Invalid YAML: {err}"
        else:
            message = "YAML metadata must be a mapping"
        if not isinstance(metadata, dict):
            # `hf_raise_for_status` turns a 400 into BadRequestError, re-raised as ValueError with `errors`.
            raise HubError(400, message, errors=[{"message": message}])
        return {"errors": [], "warnings": []}

    def _repo_info(self, type: str, repo_id: str, revision: str | None = None) -> dict:
        """`HfApi.repo_info` / `model_info` / `dataset_info`, also `repo_exists` and `revision_exists`."""
        with self.stub._lock:
            repo, commit = self.stub._lookup(type, repo_id, revision)
            return {
                "_id": repo.history[0].oid[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": commit.created_at,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }

    def _preupload(self, type: str, repo_id: str, revision: str) -> dict:
        """Tell the client how to upload each file: always "regular" (inline base64 in the commit).

        `oid` is the git blob id of the current remote file, if any: the client compares it with the
        local file and drops unchanged files from the commit (an all-unchanged upload makes no commit).
        """
        self._require_auth()
        if "create_pr" in self.query:
            raise self._unhandled("pull requests are not emulated")
        payload = self._json_body()
        with self.stub._lock:
            _, head = self.stub._lookup(type, repo_id, revision)
            files = []
            for entry in payload.get("files", []):
                remote = head.files.get(entry["path"])
                files.append(
                    {
                        "path": entry["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(remote) if remote is not None else None,
                    }
                )
            return {"files": files, "commitOid": head.oid}

    def _commit(self, type: str, repo_id: str, revision: str) -> dict:
        """Apply an ndjson commit: one {"key": ..., "value": ...} object per line.

        Keys: "header" (summary, description, parentCommit?), "file" (path, content, encoding),
        "deletedFile" / "deletedFolder" (path). Anything else ("lfsFile") is answered 404 and recorded
        in `HubStub.unhandled`: the stub never asks for LFS/Xet uploads, so it has no such content.
        """
        self._require_auth()
        if "create_pr" in self.query:
            raise self._unhandled("pull requests are not emulated")
        if unquote(revision) != DEFAULT_BRANCH:
            # Commits target a branch; the only branch emulated is `main`.
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"Invalid ndjson commit payload: {err}") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]

        with self.stub._lock:
            repo, head = self.stub._lookup(type, repo_id, revision)
            parent = header.get("parentCommit")
            if parent and not head.oid.startswith(parent):
                raise HubError(412, f"Parent commit {parent} is not the head of {DEFAULT_BRANCH} ({head.oid})")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    content = value.get("content", "")
                    files[path] = (
                        base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    )
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                else:  # e.g. "lfsFile", only sent for LFS/Xet uploads, which preupload never asks for
                    raise self._unhandled(f"commit operation {key!r} on {path!r} is not emulated")
            commit = Commit(
                oid=self.stub._new_oid(head.oid, header.get("summary", "")),
                message=header.get("summary", ""),
                description=header.get("description", ""),
                files=files,
            )
            repo.history.append(commit)
            return {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.stub._repo_url(repo)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
