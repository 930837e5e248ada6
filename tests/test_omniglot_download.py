"""download=True against a real HTTP server on the loopback interface, serving the real zips."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from metalearn.data import OmniglotTasks
from metalearn.data import omniglot_archive as oa


class _Handler(BaseHTTPRequestHandler):
    """Serves ``/omniglot/<name>.zip`` from ``server.files``; ``server.mode`` breaks it."""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        srv.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if not self.path.startswith("/omniglot/") or name not in srv.files:
            self.send_error(404)
            return
        data = srv.files[name].read_bytes()
        body = data[: len(data) // 2] if srv.mode in ("short file", "dropped") else data
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data if srv.mode == "dropped" else body)))
        self.end_headers()
        half = len(body) // 2
        self.wfile.write(body[:half])
        self.wfile.flush()
        if srv.watch is not None:  # what the client's folder holds mid-transfer
            srv.snapshots.append((name, sorted(p.name for p in srv.watch.iterdir())))
        self.wfile.write(body[half:])
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(omniglot_zips):
    # Loopback only, any free port.
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files = {f"{n}.zip": p for n, p in omniglot_zips.items()}
    srv.mode, srv.watch, srv.requests, srv.snapshots = "ok", None, [], []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/omniglot"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No data in $METALEARN_DATA or ~/.cache, a fresh cache; returns the download root."""
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "root"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verify_rename_decode_end_to_end(
    server, nowhere, monkeypatch, omniglot_zips, omniglot_images
):
    # The url argument wins over the environment (which points at a closed port).
    monkeypatch.setenv("METALEARN_OMNIGLOT_URL", "http://127.0.0.1:9/closed")
    dest = nowhere / "omniglot"
    server.watch = dest
    tasks = OmniglotTasks(root=nowhere, download=True, url=server.url, progress=False)

    assert server.requests == ["/omniglot/images_background.zip", "/omniglot/images_evaluation.zip"]
    for name, listing in server.snapshots:  # mid-transfer: only a temp file, no final name
        assert name not in listing
        assert any(f.startswith(f".{name}.") and f.endswith(".part") for f in listing), listing
    assert sorted(p.name for p in dest.iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]
    for name, src in omniglot_zips.items():
        assert _sha256(dest / f"{name}.zip") == _sha256(src)
    # Decoded from the downloaded copies into the fresh cache: the second and last decode.
    cache = sorted((nowhere.parent / "cache").iterdir())
    assert [p.suffix for p in cache] == [".npy", ".digest"]  # the array and its digest
    images = oa.load_images(nowhere, progress=False)
    assert images is not omniglot_images and torch.equal(images, omniglot_images)
    assert tasks.sample(2).support_x.shape == (2, 5, 1, 28, 28)

    OmniglotTasks(root=nowhere, download=True, url=server.url, progress=False)
    assert len(server.requests) == 2  # present files are not fetched again


@pytest.mark.parametrize(
    "mode, error, text",
    [
        ("short file", oa.OmniglotIntegrityError, "is not a good images_background.zip"),
        ("dropped", oa.OmniglotDownloadError, "stopped after"),
        ("missing", oa.OmniglotDownloadError, "HTTP Error 404"),
    ],
)
def test_failed_download_leaves_no_file(server, nowhere, monkeypatch, mode, error, text):
    server.mode = mode
    if mode == "missing":
        server.files = {}
    monkeypatch.setenv("METALEARN_OMNIGLOT_URL", server.url)  # the environment variable is used
    with pytest.raises(error, match=text) as err:
        oa.download_archives(nowhere, progress=False)
    msg = str(err.value)
    assert f"{server.url}/images_background.zip" in msg and "nothing was saved" in msg
    assert server.requests == ["/omniglot/images_background.zip"]  # stopped at the first
    assert list((nowhere / "omniglot").iterdir()) == []  # neither final name nor temp file
    assert not (nowhere.parent / "cache").exists()


def test_the_cli_downloads_with_a_flag_and_speaks_in_flags(server, nowhere, monkeypatch,
                                                            capsys):
    from metalearn.cli import main

    monkeypatch.setenv("METALEARN_OMNIGLOT_URL", server.url)
    argv = ["train", "--dataset", "omniglot", "--data-root", str(nowhere), "--iterations", "1",
            "--val-every", "1", "--val-tasks", "2", "--no-progress",
            "--checkpoint", str(nowhere.parent / "run.pt")]
    # Without --download: the advice names the flags, not the library's arguments.
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "add --download" in err and "--data-root" in err
    assert "download=True" not in err and "root=" not in err
    assert server.requests == []
    assert main([*argv, "--download"]) == 0
    assert server.requests == ["/omniglot/images_background.zip",
                               "/omniglot/images_evaluation.zip"]
    assert sorted(p.name for p in (nowhere / "omniglot").iterdir()) == [
        "images_background.zip", "images_evaluation.zip"]
