"""The real, unpatched huggingface_hub client against tests/hub_server.py (no JAX needed).

Each test pins down what huggingface_hub (2.5.0) actually does, so the tests that use the server
for model downloads can rely on it: where the cache puts a file, when a download is resumed,
which exceptions come out, that a corrupted body is *not* caught, and that concurrent callers
download once.
"""
import hashlib
import os
import threading

import pytest
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.file_download import _CACHED_NO_EXIST

from hub_server import HubServer

REPO = 'acme/tiny-net'


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    # build_hf_headers() otherwise fetches https://huggingface.co/api/agent-harnesses once per
    # process for its user agent (utils/_detect_agent.py): keep the tests off the network.
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_TELEMETRY', True)


def make_repo(root, files):
    for name, data in files.items():
        path = root / REPO / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def hub(tmp_path):
    make_repo(tmp_path / 'hub', {'model.safetensors': os.urandom(3000), 'sub/config.json': b'{"a": 1}'})
    with HubServer(tmp_path / 'hub') as server:
        yield server


def download(server, cache, filename='model.safetensors', **kwargs):
    return hf_hub_download(REPO, filename, endpoint=server.url, cache_dir=cache, **kwargs)


def blobs(cache):
    return sorted(os.listdir(cache / f'models--{REPO.replace("/", "--")}' / 'blobs'))


def test_download_then_cache(hub, tmp_path):
    cache = tmp_path / 'cache'
    data = (hub.root / REPO / 'model.safetensors').read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()

    path = download(hub, cache)
    assert open(path, 'rb').read() == data
    assert os.path.realpath(path) == str(cache / f'models--acme--tiny-net/blobs/{sha256}')
    assert path == str(cache / f'models--acme--tiny-net/snapshots/{hub.commit(REPO)}/model.safetensors')
    assert try_to_load_from_cache(REPO, 'model.safetensors', cache_dir=cache) == path
    # One HEAD on /resolve (answered by a 302 that is not followed), one GET on the CDN; no API
    # call and nothing Xet.
    assert [(m, p) for m, p, _ in hub.requests] == [
        ('HEAD', f'/{REPO}/resolve/main/model.safetensors'), ('GET', f'/cdn/{REPO}/model.safetensors')]

    # Cached: "main" still costs a HEAD (to learn the commit), but no content GET.
    assert download(hub, cache) == path
    assert hub.gets('model.safetensors') == 1
    assert [m for m, _, _ in hub.requests] == ['HEAD', 'GET', 'HEAD']
    # A commit hash as revision, already cached: no request at all.
    assert download(hub, cache, revision=hub.commit(REPO)) == path
    assert len(hub.requests) == 3

    # Files in folders; blobs named by sha256 (the server treats every file as LFS).
    config = download(hub, cache, 'sub/config.json')
    assert open(config, 'rb').read() == b'{"a": 1}'
    assert blobs(cache) == sorted([sha256, hashlib.sha256(b'{"a": 1}').hexdigest()])


def test_local_files_only(hub, tmp_path):
    cache = tmp_path / 'cache'
    with pytest.raises(LocalEntryNotFoundError, match='outgoing traffic has been disabled'):
        download(hub, cache, local_files_only=True)
    assert hub.requests == []
    path = download(hub, cache)
    assert download(hub, cache, local_files_only=True) == path
    assert len(hub.requests) == 2


@pytest.mark.parametrize('size, cut_after, resumed_from', [
    # The client writes what it receives in chunks of constants.DOWNLOAD_CHUNK_SIZE (10 MiB)
    # (file_download.py http_get): it resumes from the last whole chunk it wrote, with a Range...
    (constants.DOWNLOAD_CHUNK_SIZE + 65536, constants.DOWNLOAD_CHUNK_SIZE + 32768, constants.DOWNLOAD_CHUNK_SIZE),
    # ...and a cut before the first whole chunk starts over, without one.
    (3000, 1000, None),
])
def test_cut_download_is_retried_within_the_call(tmp_path, size, cut_after, resumed_from):
    data = os.urandom(size)
    make_repo(tmp_path / 'hub', {'model.safetensors': data})
    cache = tmp_path / 'cache'
    with HubServer(tmp_path / 'hub') as hub:
        hub.cut_after = cut_after
        path = download(hub, cache)        # the retry waits 1 s
        assert open(path, 'rb').read() == data
        gets = [headers for method, _, headers in hub.requests if method == 'GET']
        assert len(gets) == 2 and hub.cut_times == 0
        assert 'range' not in gets[0]
        expected = None if resumed_from is None else f'bytes={resumed_from}-'
        assert gets[1].get('range') == expected
    assert blobs(cache) == [hashlib.sha256(data).hexdigest()]   # no *.incomplete left


def test_missing_repo_revision_and_file(hub, tmp_path):
    cache = tmp_path / 'cache'
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download('acme/nothing', 'model.safetensors', endpoint=hub.url, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        download(hub, cache, revision='v9')
    with pytest.raises(EntryNotFoundError):    # huggingface_hub.errors.RemoteEntryNotFoundError
        download(hub, cache, 'missing.bin')
    # The 404 names the commit (X-Repo-Commit), so the cache remembers that the file is absent.
    assert try_to_load_from_cache(REPO, 'missing.bin', cache_dir=cache) is _CACHED_NO_EXIST
    assert try_to_load_from_cache(REPO, 'model.safetensors', cache_dir=cache) is None
    assert hub.gets('') == 0


def test_corrupt_body_is_not_detected(hub, tmp_path):
    """hf_hub_download checks the size of a plain HTTP download, not its sha256."""
    cache = tmp_path / 'cache'
    data = (hub.root / REPO / 'model.safetensors').read_bytes()
    hub.corrupt = True
    path = download(hub, cache)
    got = open(path, 'rb').read()
    assert len(got) == len(data) and got != data
    assert sum(a != b for a, b in zip(got, data)) == 1
    assert os.path.basename(os.path.realpath(path)) == hashlib.sha256(data).hexdigest()


def test_concurrent_downloads_get_once(hub, tmp_path):
    """A FileLock per blob (cache/.locks/models--org--name/<sha256>.lock) serialises callers."""
    cache = tmp_path / 'cache'
    hub.delay = 0.3
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(download(hub, cache))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 4 and len(set(paths)) == 1
    assert hub.gets('model.safetensors') == 1
    assert [m for m, _, _ in hub.requests].count('HEAD') == 4
    sha256 = os.path.basename(os.path.realpath(paths[0]))
    assert (cache / '.locks' / 'models--acme--tiny-net' / f'{sha256}.lock').exists()

