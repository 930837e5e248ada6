"""The on-disk Omniglot data: search, content checks, decoding, cache and memo (real data)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import OmniglotTasks
from metalearn.data import omniglot_archive as oa


def _sha(path: Path, algo: str = "sha256") -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


def _png_names(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        return sorted(n for n in zf.namelist() if n.endswith(".png"))


def _reference_decode(zip_path: Path, name: str) -> np.ndarray:
    with zipfile.ZipFile(zip_path) as zf, Image.open(io.BytesIO(zf.read(name))) as im:
        assert im.mode == "1" and im.size == (105, 105)
        return 255 - np.asarray(im.convert("L").resize((28, 28), Image.Resampling.LANCZOS))


def _listing(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs if d.exists() for p in d.rglob("*")}


def test_decoded_images_are_the_pngs_in_path_order(omniglot_images, omniglot_zips):
    images = omniglot_images
    assert images.shape == (1623, 20, 28, 28) and images.dtype == torch.uint8
    bg = _png_names(omniglot_zips["images_background"])
    ev = _png_names(omniglot_zips["images_evaluation"])
    assert len(bg) == 964 * 20 and len(ev) == 659 * 20
    # Path order, background first (not the order of the ids in the file names).
    assert bg[0] == "images_background/Alphabet_of_the_Magi/character01/0709_01.png"
    assert ev[0] == "images_evaluation/Angelic/character01/0965_01.png"
    for char, drawing in [(0, 0), (0, 19), (500, 7), (963, 19), (964, 0), (1622, 19)]:
        zip_path, names, c = (
            (omniglot_zips["images_background"], bg, char)
            if char < 964
            else (omniglot_zips["images_evaluation"], ev, char - 964)
        )
        expected = _reference_decode(zip_path, names[c * 20 + drawing])
        assert np.array_equal(images[char, drawing].numpy(), expected), (char, drawing)


def test_images_are_inverted_lanczos_not_nearest(omniglot_images, omniglot_zips):
    images = omniglot_images
    # Ink is 255 and rare: about 8% of the mass; a non-inverted image would average ~234.
    assert 10 < images.float().mean().item() < 40
    assert images.min().item() == 0 and images.max().item() == 255
    assert (images[:, :, 0, :] == 0).float().mean().item() > 0.95  # background border
    # Lanczos gives grey edges; NEAREST on the mode-"1" PNG would give only 0 and 255.
    assert len(torch.unique(images[:50])) > 100
    name = _png_names(omniglot_zips["images_background"])[0]
    with zipfile.ZipFile(omniglot_zips["images_background"]) as zf:
        im = Image.open(io.BytesIO(zf.read(name)))
        nearest = np.asarray(im.resize((28, 28), Image.Resampling.LANCZOS), dtype=np.uint8)
    assert set(np.unique(nearest).tolist()) <= {0, 1}  # the Pillow pitfall the code avoids
    assert len(np.unique(images[0, 0].numpy())) > 2


def test_cache_is_one_array_keyed_by_zip_sha256_with_its_digest(
    omniglot_images, omniglot_zips, omniglot_cache
):
    files = sorted(p.name for p in omniglot_cache.iterdir())
    keys = [_sha(omniglot_zips[n])[:16] for n in oa.ARCHIVE_NAMES]
    name = f"omniglot-28px-f{oa.CACHE_FORMAT}-{keys[0]}-{keys[1]}.npy"
    assert files == [name, f"{name}.digest"]
    assert np.array_equal(np.load(omniglot_cache / name), omniglot_images.numpy())
    crc = zlib.crc32(omniglot_images.numpy().tobytes())
    assert (omniglot_cache / f"{name}.digest").read_text() == f"crc32:{crc:08x}\n"


def test_memo_then_disk_cache_serve_without_decoding(omniglot_images, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(oa, "_decode", no_decode)
    assert oa.load_images(progress=False) is omniglot_images  # in-process memo
    for split in ("train", "val", "test"):
        OmniglotTasks(split=split, progress=False)
    oa.clear_memo()
    again = oa.load_images(progress=False)  # from the .npy cache
    assert again is not omniglot_images and torch.equal(again, omniglot_images)


def test_search_order_root_alone_else_env_then_home(tmp_path, monkeypatch, omniglot_zips):
    dirs = {k: tmp_path / k for k in ("root", "env", "home/.cache/metalearn")}
    for d in dirs.values():
        (d / "omniglot").mkdir(parents=True)
        for name, src in omniglot_zips.items():
            (d / "omniglot" / f"{name}.zip").symlink_to(src)
    monkeypatch.setenv("METALEARN_DATA", str(dirs["env"]))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    bg = "images_background"
    assert oa.find_archives(dirs["root"])[bg] == dirs["root"] / "omniglot" / f"{bg}.zip"
    assert oa.find_archives()[bg] == dirs["env"] / "omniglot" / f"{bg}.zip"
    monkeypatch.delenv("METALEARN_DATA")
    assert oa.find_archives()[bg] == dirs["home/.cache/metalearn"] / "omniglot" / f"{bg}.zip"
    # Each zip is taken from the first place holding it.
    (dirs["env"] / "omniglot" / "images_evaluation.zip").unlink()
    monkeypatch.setenv("METALEARN_DATA", str(dirs["env"]))
    found = oa.find_archives()
    assert found[bg].parent == dirs["env"] / "omniglot"
    assert found["images_evaluation"].parent == dirs["home/.cache/metalearn"] / "omniglot"
    # An explicit root is searched alone: a wrong one is an error, not a silent fall-back.
    (dirs["root"] / "omniglot" / "images_evaluation.zip").unlink()
    with pytest.raises(oa.OmniglotNotFoundError, match="images_evaluation.zip is in none"):
        oa.find_archives(dirs["root"])


def test_missing_data_lists_every_place_and_writes_nothing(tmp_path, monkeypatch, omniglot_cache):
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    before = _listing(tmp_path, omniglot_cache)
    with pytest.raises(FileNotFoundError) as err:
        OmniglotTasks(progress=False)
    assert isinstance(err.value, oa.OmniglotNotFoundError)
    msg = str(err.value)
    for place in ("env", "home/.cache/metalearn"):
        assert str(tmp_path / place / "omniglot") in msg
    assert "download=True" in msg and "METALEARN_DATA" in msg and "root=" in msg
    with pytest.raises(FileNotFoundError) as err:
        OmniglotTasks(root=tmp_path / "root", progress=False)
    assert str(tmp_path / "root" / "omniglot") in str(err.value)
    assert _listing(tmp_path, omniglot_cache) == before


def test_real_zips_pass_by_content_not_by_md5(omniglot_zips, monkeypatch):
    calls = []
    real = oa._read_checked
    monkeypatch.setattr(oa, "_read_checked", lambda *a: calls.append(a) or real(*a))
    for name, path in omniglot_zips.items():
        assert _sha(path, "md5") != oa.SPECS[name].md5  # the repack: PROVENANCE.md
        oa.verify_archive(path, name)
    assert len(calls) == 2


def test_canonical_md5_is_a_fast_path(omniglot_zips, monkeypatch):
    path = omniglot_zips["images_evaluation"]
    spec = oa.SPECS["images_evaluation"]
    fake = oa.ArchiveSpec(spec.name, _sha(path, "md5"), "0" * 64, spec.alphabets, spec.characters)
    monkeypatch.setitem(oa.SPECS, "images_evaluation", fake)
    monkeypatch.setattr(oa, "_read_checked", lambda *a: pytest.fail("content was scanned"))
    oa.verify_archive(path, "images_evaluation")


def _rewrite(src: Path, dst: Path, skip=lambda n: False, replace=None, extra=()) -> None:
    """Copy a zip entry by entry (stored), dropping, replacing or adding entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if not skip(info.filename):
                data = (replace or {}).get(info.filename) or zin.read(info.filename)
                zout.writestr(info.filename, data)
        for name, data in extra:
            zout.writestr(name, data)


def _flip_first_png_bytes(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".png"))
    raw = bytearray(dst.read_bytes())
    at = info.header_offset  # local header: 30 bytes, then the name and the extra field
    name_len, extra_len = struct.unpack("<HH", raw[at + 26 : at + 30])
    start = at + 30 + name_len + extra_len
    raw[start + 8 : start + 40] = bytes(b ^ 0x5A for b in raw[start + 8 : start + 40])
    dst.write_bytes(bytes(raw))


def _make_bad(kind: str, src: Path, dst: Path) -> None:
    pngs = _png_names(src)
    if kind == "truncated":
        dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif kind == "corrupt bytes":
        _flip_first_png_bytes(src, dst)
    elif kind == "other pngs":
        with zipfile.ZipFile(src) as zf:
            _rewrite(src, dst, replace={pngs[5]: zf.read(pngs[6])})
    elif kind == "missing character":
        _rewrite(src, dst, skip=lambda n: n.startswith(pngs[0].rsplit("/", 1)[0] + "/"))
    elif kind == "zip-slip ..":
        shutil.copyfile(src, dst)
        with zipfile.ZipFile(dst, "a") as zf:
            zf.writestr("../evil.png", b"\x89PNG not really")
    elif kind == "zip-slip absolute":
        shutil.copyfile(src, dst)
        with zipfile.ZipFile(dst, "a") as zf:
            zf.writestr("/abs.png", b"\x89PNG not really")


BAD = {
    "truncated": "cannot be read as a zip",
    "corrupt bytes": "cannot be read as a zip",
    "other pngs": "content digest",
    "missing character": "658 characters, expected 20 and 659",
    "zip-slip ..": "unsafe entry name '../evil.png'",
    "zip-slip absolute": "unsafe entry name '/abs.png'",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_archive_is_rejected_and_nothing_is_written(
    kind, tmp_path, monkeypatch, omniglot_zips, omniglot_cache
):
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "none"))  # only the bad copy is found
    data = tmp_path / "data" / "omniglot"
    data.mkdir(parents=True)
    (data / "images_background.zip").symlink_to(omniglot_zips["images_background"])
    bad = data / "images_evaluation.zip"
    _make_bad(kind, omniglot_zips["images_evaluation"], bad)
    before = _listing(tmp_path, omniglot_cache)

    with pytest.raises(ValueError) as err:  # OmniglotIntegrityError is a ValueError
        oa.verify_archive(bad, "images_evaluation")
    assert isinstance(err.value, oa.OmniglotIntegrityError)
    for msg in (str(err.value), None):
        if msg is None:  # the same through the sampler, with a real cache already present
            with pytest.raises(oa.OmniglotIntegrityError) as err2:
                OmniglotTasks(root=tmp_path / "data", progress=False)
            msg = str(err2.value)
        assert str(bad) in msg and BAD[kind] in msg
        assert "download=True" in msg and "METALEARN_DATA" in msg
    assert _listing(tmp_path, omniglot_cache) == before
    assert not list(tmp_path.parent.glob("**/evil.png")) and not Path("/abs.png").exists()


def test_error_classes_are_standard_exceptions():
    assert issubclass(oa.OmniglotNotFoundError, FileNotFoundError)
    assert issubclass(oa.OmniglotIntegrityError, ValueError)
    assert issubclass(oa.OmniglotDownloadError, OSError)
    assert all(
        issubclass(e, oa.OmniglotError)
        for e in (oa.OmniglotNotFoundError, oa.OmniglotIntegrityError, oa.OmniglotDownloadError)
    )
    assert os.fspath(oa.cache_dir())  # a path, whatever the environment
