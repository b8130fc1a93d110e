"""A small local stand-in for the Hugging Face Hub's file download protocol, for tests.

`HubServer(root)` serves the files under `root/<org>/<name>/<filename>` so that the real
`huggingface_hub.hf_hub_download(repo_id, filename, endpoint=server.url, cache_dir=...)`
downloads them, and `huggingface_hub.try_to_load_from_cache` then finds them. Every file is
served as the Hub serves a Git LFS file:

    HEAD|GET {url}/<org>/<name>/resolve/<revision>/<filename>
        302 Found, Location: {cdn_url}/cdn/<org>/<name>/<filename>
            X-Repo-Commit:  sha1 of the repo id (40 hex; revision must be "main" or this commit)
            X-Linked-Etag:  "sha256 of the file"   <- the client names the cached blob by this
            X-Linked-Size:  the file's size
            ETag:           "git blob id of the LFS pointer file" (as the Hub; the client prefers X-Linked-Etag)
    HEAD|GET {cdn_url}/cdn/<org>/<name>/<filename>
        200 (or 206 for `Range: bytes=START-` / `bytes=START-END`, with Content-Range) and the bytes.
    Anything else: 404; a missing repo, revision or file carries the Hub's `X-Error-Code`
    (RepoNotFound, RevisionNotFound, EntryNotFound), which huggingface_hub maps to
    RepositoryNotFoundError, RevisionNotFoundError and RemoteEntryNotFoundError.

The "CDN" is a second listener on another port of 127.0.0.1. On the real Hub the LFS redirect
goes to another host; huggingface_hub (2.5.0, utils/_http.py `_httpx2_follow_hub_redirects_with_backoff`)
follows a HEAD redirect that stays on the same origin (scheme, host, port) and only stops at one
that leaves it, reading the metadata off the 302 itself. A redirect to a path on the same port
would therefore be followed, and the CDN answer would need the Hub's headers (X-Repo-Commit)
itself: not what the Hub does. No X-Xet-* header is ever sent, so the client never switches to
the Xet protocol and downloads with plain HTTP GETs.

Fault injection, attributes that may be changed at any time:
    cut_after  int | None  while `cut_times` > 0, a content GET sends its full Content-Length
                           but closes the connection after this many body bytes (and
                           `cut_times` counts down by one)
    cut_times  int         how many content GETs get cut (default 1)
    corrupt    bool        the byte at offset size // 2 of every file is served flipped, while
                           the ETag stays the sha256 of the true file
    delay      float       seconds a content GET waits before it answers

Every request received on either port is recorded in `requests` as (method, path, headers),
path as sent (quoted), header names lower-cased.
"""
import hashlib
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

CHUNK = 1 << 20


class HubServer:
    """Serves `root/<org>/<name>/<filename>` as Hub model repos `<org>/<name>`; see the module doc.

    Listens as soon as it is made; `close()` (or leaving a `with` block) stops it.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.requests = []            # (method, path, {lower-cased header: value})
        self.cut_after = None
        self.cut_times = 1
        self.corrupt = False
        self.delay = 0.0
        self._lock = threading.Lock()
        self._sha256 = {}             # (path, mtime_ns, size) -> hex digest
        self._connections = set()     # open sockets, closed by close()
        self._servers = []
        for role in ('hub', 'cdn'):
            server = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
            server.hub, server.role = self, role
            # a short poll interval: close() (server.shutdown) waits for the loop to notice
            threading.Thread(target=server.serve_forever, args=(0.05,), name=f'HubServer-{role}',
                             daemon=True).start()
            self._servers.append(server)
        self.url = 'http://127.0.0.1:%d' % self._servers[0].server_port
        self.cdn_url = 'http://127.0.0.1:%d' % self._servers[1].server_port

    def gets(self, suffix):
        """How many content GETs (to the CDN) had a path ending with `suffix`."""
        with self._lock:
            return sum(1 for method, path, _ in self.requests
                       if method == 'GET' and path.startswith('/cdn/') and path.endswith(suffix))

    def commit(self, repo_id):
        """The commit every revision "main" of `repo_id` resolves to: sha1 of the repo id."""
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def sha256(self, path):
        """sha256 hex of the file at `path`, computed once per (path, mtime, size)."""
        st = os.stat(path)
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._sha256:
                return self._sha256[key]
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(CHUNK), b''):
                h.update(block)
        with self._lock:
            self._sha256[key] = h.hexdigest()
        return self._sha256[key]

    def close(self):
        for server in self._servers:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:      # keep-alive connections the client pools
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _take_cut(self):
        """Body bytes to send before hanging up on this content GET, or None to send them all."""
        with self._lock:
            if self.cut_after is None or self.cut_times <= 0:
                return None
            self.cut_times -= 1
            return self.cut_after


def _pointer_oid(sha256, size):
    """Git blob id of the LFS pointer file: the ETag the Hub puts on an LFS file's 302."""
    pointer = f'version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n'.encode()
    return hashlib.sha1(b'blob %d\0' % len(pointer) + pointer).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'     # keep-alive, as the client pools connections

    def setup(self):
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.hub._lock:
                self.server.hub._connections.discard(self.connection)

    def log_message(self, format, *args):  # quiet
        pass

    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def _route(self):
        hub = self.server.hub
        with hub._lock:
            hub.requests.append((self.command, self.path,
                                 {k.lower(): v for k, v in self.headers.items()}))
        parts = [unquote(p) for p in urlsplit(self.path).path.split('/')[1:]]
        if self.server.role == 'hub' and len(parts) >= 5 and parts[2] == 'resolve':
            self._resolve(f'{parts[0]}/{parts[1]}', parts[3], '/'.join(parts[4:]))
        elif self.server.role == 'cdn' and len(parts) >= 4 and parts[0] == 'cdn':
            self._content(f'{parts[1]}/{parts[2]}', '/'.join(parts[3:]))
        else:
            self._error(404, None, 'Not found')

    def _find(self, repo_id, filename):
        """(repo exists, path of the file or None)."""
        repo = (self.server.hub.root / repo_id).resolve()
        if not repo.is_dir():
            return False, None
        path = (repo / filename).resolve()
        return True, (path if path.is_relative_to(repo) and path.is_file() else None)

    def _resolve(self, repo_id, revision, filename):
        hub = self.server.hub
        repo_exists, path = self._find(repo_id, filename)
        commit = hub.commit(repo_id)
        if not repo_exists:
            return self._error(404, 'RepoNotFound', 'Repository not found')
        if revision not in ('main', commit):
            return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
        if path is None:   # the Hub names the commit on a missing file: the client caches the absence
            return self._error(404, 'EntryNotFound', 'Entry not found', {'X-Repo-Commit': commit})
        sha256, size = hub.sha256(path), path.stat().st_size
        self._reply(302, {
            'Location': f'{hub.cdn_url}/cdn/{repo_id}/{quote(filename)}',
            'X-Repo-Commit': commit,
            'X-Linked-Etag': f'"{sha256}"',
            'X-Linked-Size': str(size),
            'ETag': f'"{_pointer_oid(sha256, size)}"',
            'Content-Length': '0',
        })

    def _content(self, repo_id, filename):
        hub = self.server.hub
        _, path = self._find(repo_id, filename)
        if path is None:
            return self._error(404, None, 'Not found')
        size = path.stat().st_size
        headers = {'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes',
                   'ETag': f'"{hub.sha256(path)}"'}
        start, end, status = 0, size, 200          # body: bytes [start, end)
        spec = self.headers.get('Range')
        if spec:
            first, _, last = spec.strip().removeprefix('bytes=').partition('-')
            try:
                start, end = int(first), (min(int(last) + 1, size) if last else size)
            except ValueError:    # suffix ranges (bytes=-N) and lists are not served
                start, end = size, size
            if start >= end:
                return self._error(416, None, 'Range not satisfiable', {'Content-Range': f'bytes */{size}'})
            status = 206
            headers['Content-Range'] = f'bytes {start}-{end - 1}/{size}'
        headers['Content-Length'] = str(end - start)
        if self.command == 'HEAD':
            return self._reply(status, headers)
        cut = hub._take_cut()
        if hub.delay:
            time.sleep(hub.delay)
        self._reply(status, headers)
        flip = size // 2 if hub.corrupt else -1
        stop = end if cut is None else min(end, start + cut)
        with open(path, 'rb') as f:
            f.seek(start)
            offset = start
            while offset < stop:
                block = bytearray(f.read(min(CHUNK, stop - offset)))
                if offset <= flip < offset + len(block):
                    block[flip - offset] ^= 0xFF
                self.wfile.write(block)
                offset += len(block)
        if cut is not None:      # hang up short of Content-Length
            self.wfile.flush()
            self.close_connection = True

    def _error(self, status, code, message, extra=None):
        body = json.dumps({'error': message}).encode()
        headers = {'Content-Type': 'application/json', 'Content-Length': str(len(body)),
                   'X-Error-Message': message, **(extra or {})}
        if code:
            headers['X-Error-Code'] = code
        self._reply(status, headers, body)

    def _reply(self, status, headers, body=b''):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != 'HEAD':
            self.wfile.write(body)
