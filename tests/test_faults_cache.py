"""Issue #33 for the decoded-image cache: a damaged cache is reported in one line and
rebuilt from the zips, never used. Each test fails on the code before the issue."""

import shutil
import warnings

import numpy as np
import pytest
import torch

from metalearn.cli import main
from metalearn.data import omniglot_archive as oa

SHAPE = (oa.NUM_CHARACTERS, oa.DRAWINGS, oa.IMAGE_SIZE, oa.IMAGE_SIZE)


@pytest.fixture
def own_cache(tmp_path, monkeypatch, omniglot_images, omniglot_cache):
    """A copy of the session's cache in a folder of the test's own, and an empty memo."""
    for f in omniglot_cache.iterdir():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path))
    monkeypatch.setattr(oa, "_MEMO", {})
    (npy,) = tmp_path.glob("*.npy")
    return npy


def test_corrupted_pixels_are_detected_and_decoded_again(own_cache, omniglot_images):
    # 20 MB of pixel bytes overwritten, the .npy header left intact.
    raw = bytearray(own_cache.read_bytes())
    header = len(raw) - omniglot_images.numel()
    raw[header: header + 20_000_000] = b"\xff" * 20_000_000
    own_cache.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="does not match its digest"):
        images = oa.load_images(progress=False)
    assert torch.equal(images, omniglot_images)
    oa.clear_memo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache is used as it is
        assert torch.equal(oa.load_images(progress=False), omniglot_images)


def fake_decode(monkeypatch):
    """Decoding stand-in (the real one takes seconds): fills every image with 7."""
    calls = []
    monkeypatch.setattr(oa, "_read_checked", lambda path, spec: [])

    def decode(pngs, out, bar):
        calls.append(1)
        out.fill(7)

    monkeypatch.setattr(oa, "_decode", decode)
    return calls


DAMAGE = {
    "empty file": (lambda b: b"", "cannot be read"),
    "truncated": (lambda b: b[: len(b) // 2], "cannot be read"),
    "garbage header": (lambda b: b"\x00" * 200 + b[200:], "cannot be read"),
    "one pixel changed": (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "does not match its digest"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_is_reported_once_and_rebuilt(own_cache, monkeypatch, damage):
    edit, message = DAMAGE[damage]
    own_cache.write_bytes(edit(own_cache.read_bytes()))
    calls = fake_decode(monkeypatch)
    with pytest.warns(UserWarning) as record:
        images = oa.load_images(progress=False)
    assert len(record) == 1 and message in str(record[0].message)
    assert issubclass(record[0].category, oa.CacheWarning)
    assert str(own_cache) in str(record[0].message) and "rebuilding it" in str(record[0].message)
    assert calls == [1] and bool((images == 7).all())
    assert np.array_equal(np.load(own_cache), np.full(SHAPE, 7, np.uint8))  # repaired on disk


def test_cache_without_digest_is_not_trusted(own_cache, monkeypatch):
    from metalearn.data.array_cache import digest_path

    digest_path(own_cache).unlink()  # as a cut-short write or an older metalearn leaves it
    calls = fake_decode(monkeypatch)
    with pytest.warns(UserWarning, match="has no digest"):
        oa.load_images(progress=False)
    assert calls == [1] and digest_path(own_cache).exists()


def test_empty_cache_through_the_command_is_one_warning_line(own_cache, monkeypatch, capsys,
                                                            tmp_path):
    own_cache.write_bytes(b"")
    fake_decode(monkeypatch)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    code = main(["train", "--dataset", "omniglot", "--iterations", "1", "--meta-batch", "1",
                 "--val-every", "1", "--val-tasks", "1", "--no-progress", "--no-malloc-reuse",
                 "--checkpoint", str(tmp_path / "run" / "o.pt")])
    err = capsys.readouterr().err
    assert code == 0, err
    # (The decoding progress bar shows even with --no-progress; only warnings count here.)
    lines = [x for x in err.splitlines() if "warning" in x.lower() or "Error" in x]
    assert lines == [f"metalearn train: warning: the Omniglot cache {own_cache} cannot be read "
                     "(EOFError: No data left in file); rebuilding it from the zips"]
