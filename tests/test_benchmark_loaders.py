"""The benchmark loaders on small fixtures in the real file formats: published splits,
decoding against independent references, caches, content checks, corrupt and truncated
files, and the CIFAR-100 download against a loopback server."""

from __future__ import annotations

import io
import pickle
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from metalearn.data import (
    CIFARFSTasks,
    FC100Tasks,
    MiniImageNetTasks,
    TieredImageNetTasks,
    cifar100,
    image_sets,
    mini_imagenet,
    tiered_imagenet,
)
from metalearn.data import published_splits as ps
from metalearn.data.image_sets import (
    DatasetDownloadError,
    DatasetIntegrityError,
    DatasetNotFoundError,
    check_counts,
)
from tests import benchmark_fixtures as fx


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty data and cache folders of the test's own; returns the data root."""
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METALEARN_CIFAR100_URL", raising=False)
    return tmp_path / "data"


@pytest.fixture
def subset_ok(monkeypatch):
    """The test hook: accept fixtures that hold a subset of the published data."""
    monkeypatch.setattr(image_sets, "_ALLOW_SUBSET", True)


# -- the published splits -----------------------------------------------------------------
def test_published_splits_have_their_sizes_and_are_disjoint():
    sizes = {"mini": (ps.MINI_IMAGENET, (64, 16, 20)), "tiered": (ps.TIERED_IMAGENET,
             (351, 97, 160)), "cifar-fs": (ps.CIFAR_FS, (64, 16, 20)),
             "fc100": (ps.FC100, (60, 20, 20))}
    for name, (split, want) in sizes.items():
        parts = [split[s] for s in ("train", "val", "test")]
        assert tuple(len(p) for p in parts) == want, name
        assert all(len(set(p)) == len(p) for p in parts), name
        assert not (set(parts[0]) & set(parts[1]) or set(parts[0]) & set(parts[2])
                    or set(parts[1]) & set(parts[2])), name
    assert len(set(ps.MINI_IMAGENET["train"] + ps.MINI_IMAGENET["val"]
                   + ps.MINI_IMAGENET["test"])) == 100
    for split in (ps.CIFAR_FS, ps.FC100):
        assert sorted(split["train"] + split["val"] + split["test"]) == list(ps.CIFAR100_CLASSES)
    assert [len(ps.FC100_SUPERCLASSES[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert [len(ps.TIERED_IMAGENET_CATEGORIES[s]) for s in ("train", "val", "test")] == [20, 6, 8]
    assert len(ps.CIFAR100_SUPERCLASSES) == 20
    assert all(len(v) == 5 for v in ps.CIFAR100_SUPERCLASSES.values())
    # Pinned: a change here silently changes every reported result.
    assert ps.MINI_IMAGENET["test"][:3] == ("n01930112", "n01981276", "n02099601")
    assert ps.TIERED_IMAGENET["val"][:2] == ("n02099267", "n02099429")
    assert ps.CIFAR_FS["test"][:3] == ("whale", "poppy", "rose")
    assert ps.FC100_SUPERCLASSES["test"] == ("aquatic_mammals", "insects", "medium_mammals",
                                             "people")


def test_the_count_check_catches_an_incomplete_split():
    names = [f"c{i}" for i in range(4)]
    full = np.repeat(np.arange(4), 600)
    check_counts("X", "train", full, names, 600, 2400, "fix", "src")  # complete: passes
    with pytest.raises(DatasetIntegrityError, match="holds 3 of the 4 X train classes"):
        check_counts("X", "train", full[full != 2], names, 600, None, "fix", "src")
    with pytest.raises(DatasetIntegrityError, match="class c1 has 599 train images, not 600"):
        check_counts("X", "train", np.delete(full, 700), names, 600, None, "fix", "src")
    with pytest.raises(DatasetIntegrityError, match="holds 2399 X train images, not the "
                                                    "published 2400"):
        check_counts("X", "train", np.delete(full, 700), names, None, 2400, "fix", "src")


# -- miniImageNet ---------------------------------------------------------------------------
def test_mini_pickle_decodes_to_the_pickled_images(env, subset_ok):
    data = fx.mini_pickles(env / "mini-imagenet")
    for split in ("train", "val", "test"):
        images, labels = mini_imagenet.load_split(env, split)
        d = data[split]
        assert torch.equal(images, torch.from_numpy(d["image_data"].transpose(0, 3, 1, 2)))
        for name, rows in d["class_dict"].items():
            assert (labels[rows] == ps.MINI_IMAGENET[split].index(name)).all()
    tasks = MiniImageNetTasks(env, "val", ways=3, shots=2, queries=4, seed=1)
    batch = tasks.sample(5)
    assert batch.support_x.shape == (5, 6, 3, 84, 84) and batch.support_x.dtype == torch.float32
    x = torch.from_numpy(data["val"]["image_data"].transpose(0, 3, 1, 2))
    for t in range(5):
        for j in range(3):
            rows = tasks.last_indices[t, j]
            assert torch.equal(batch.support_x[t, 2 * j:2 * j + 2], x[rows[:2]].float() / 255)
            assert torch.equal(batch.query_x[t, 4 * j:4 * j + 4], x[rows[2:]].float() / 255)
    assert set(tasks.class_names) == set(ps.MINI_IMAGENET["val"][:6])


@pytest.mark.parametrize("nested", [False, True])
def test_mini_csv_and_images_decode_like_pillow(env, subset_ok, nested):
    rows = fx.mini_csv(env / "mini-imagenet", classes=5, per_class=8, nested=nested)
    images, labels = mini_imagenet.load_split(env, "test")
    folder = env / "mini-imagenet" / "images"
    for i, (name, synset) in enumerate(rows["test"]):
        path = folder / (synset if nested else "") / name
        with Image.open(path) as im:
            want = np.asarray(im.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS))
        assert np.array_equal(images[i].numpy(), want.transpose(2, 0, 1))
        assert int(labels[i]) == ps.MINI_IMAGENET["test"].index(synset)


def test_the_cache_is_reused_and_keyed_by_the_source(env, subset_ok, monkeypatch):
    fx.mini_pickles(env / "mini-imagenet")
    first, _ = mini_imagenet.load_split(env, "train")
    cache = sorted(p.name for p in (env.parent / "cache").iterdir())
    assert any(n.endswith(".images.npy") for n in cache)
    assert any(n.endswith(".images.npy.digest") for n in cache)
    assert any(n.endswith(".labels.npy") for n in cache)
    monkeypatch.setattr(mini_imagenet, "_from_pickle", lambda *a: pytest.fail("decoded again"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, _ = mini_imagenet.load_split(env, "train")
    assert torch.equal(first, again)
    monkeypatch.undo()
    monkeypatch.setattr(image_sets, "_ALLOW_SUBSET", True)
    monkeypatch.setenv("METALEARN_CACHE", str(env.parent / "cache"))
    fx.mini_pickles(env / "mini-imagenet", classes=4)  # another source: another cache
    images, _ = mini_imagenet.load_split(env, "train")
    assert len(images) == 4 * 20


def test_a_damaged_cache_is_rebuilt(env, subset_ok):
    fx.mini_pickles(env / "mini-imagenet")
    first = mini_imagenet.load_split(env, "test")[0].clone()  # a copy: the cache is mapped
    (npy,) = (env.parent / "cache").glob("*.images.npy")
    raw = bytearray(npy.read_bytes())
    raw[-10] ^= 0xFF
    npy.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="does not match its digest"):
        again, _ = mini_imagenet.load_split(env, "test")
    assert torch.equal(first, again)


def test_without_the_hook_a_subset_is_refused_as_incomplete(env):
    fx.mini_pickles(env / "mini-imagenet")
    with pytest.raises(DatasetIntegrityError, match="holds 6 of the 64 miniImageNet train "
                                                    "classes.*incomplete"):
        MiniImageNetTasks(env, "train")


MINI_DAMAGE = {
    "truncated pickle": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
                         "cannot be read as a data pickle"),
    "garbage": (lambda p: p.write_bytes(b"not a pickle at all"), "cannot be read"),
    "unsafe pickle": (lambda p: p.write_bytes(pickle.dumps(
        {"image_data": io.BytesIO, "class_dict": {}})), "it names _io.BytesIO.*refusing"),
    "a list": (lambda p: p.write_bytes(pickle.dumps([1, 2])), "holds a list, not a dict"),
    "wrong image shape": (lambda p: p.write_bytes(pickle.dumps(
        {"image_data": np.zeros((2, 32, 32, 3), np.uint8), "class_dict": {}})),
        r"image_data is uint8 \(2, 32, 32, 3\)"),
    "alien class": (lambda p: p.write_bytes(pickle.dumps(
        {"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"n99999999": [0, 1]}})),
        "holds class n99999999, which is not in Ravi & Larochelle's test split"),
}


@pytest.mark.parametrize("damage", list(MINI_DAMAGE))
def test_a_bad_mini_pickle_is_reported_with_the_fix(env, subset_ok, damage):
    fx.mini_pickles(env / "mini-imagenet")
    path = env / "mini-imagenet" / "mini-imagenet-cache-test.pkl"
    change, text = MINI_DAMAGE[damage]
    change(path)
    with pytest.raises(DatasetIntegrityError, match=text) as err:
        MiniImageNetTasks(env, "test")
    assert "mini-imagenet/ folder" in str(err.value) and "root=" in str(err.value)
    assert not list((env.parent / "cache").glob("*.npy"))  # nothing half-written


def test_bad_mini_csv_sources(env, subset_ok):
    fx.mini_csv(env / "mini-imagenet", classes=5, per_class=4)
    folder = env / "mini-imagenet"
    first = sorted((folder / "images").iterdir())[0]
    first.write_bytes(first.read_bytes()[:50])  # a truncated JPEG
    with pytest.raises(DatasetIntegrityError, match=f"{first.name} cannot be decoded"):
        MiniImageNetTasks(env, "train", ways=2)
    first.unlink()
    with pytest.raises(DatasetIntegrityError, match="1 images of train.csv are missing"):
        MiniImageNetTasks(env, "train", ways=2)
    (folder / "val.csv").write_text("name,class\nx.jpg,n01855672\n")
    with pytest.raises(DatasetIntegrityError, match="not a Ravi & Larochelle split CSV"):
        MiniImageNetTasks(env, "val", ways=2)


def test_missing_mini_says_where_to_get_it_and_where_to_put_it(env):
    with pytest.raises(DatasetNotFoundError) as err:
        MiniImageNetTasks(env, "val")
    msg = str(err.value)
    assert str(env / "mini-imagenet") in msg and "mini-imagenet-cache-validation.pkl" in msg
    assert "twitter/meta-learning-lstm" in msg and "root=" in msg and "METALEARN_DATA" in msg


def test_arguments_are_checked_before_any_file(env):
    with pytest.raises(ValueError, match="only 16 classes; use ways <= 16"):
        MiniImageNetTasks(env, "val", ways=17)
    with pytest.raises(ValueError, match=r"shots \+ queries = 590 \+ 15 = 605.* only 600"):
        CIFARFSTasks(env, shots=590)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        FC100Tasks(env, split="validation")
    with pytest.raises(ValueError, match="only 97 classes"):
        TieredImageNetTasks(env, "val", ways=98)


# -- tieredImageNet -------------------------------------------------------------------------
def test_tiered_png_and_npz_give_the_same_rgb_images(env, subset_ok, tmp_path):
    png = fx.tiered(env / "tiered-imagenet")
    images, labels, names = tiered_imagenet.load_split(env, "val")
    want = torch.from_numpy(png["val"]["images"].transpose(0, 3, 1, 2).copy())
    assert torch.equal(images, want)
    assert torch.equal(labels, torch.from_numpy(png["val"]["labels"]).long())
    other = tmp_path / "other"
    fx.tiered(other / "tiered-imagenet", npz=True)  # BGR arrays of the same images
    npz_images, _, _ = tiered_imagenet.load_split(other, "val")
    assert torch.equal(npz_images, images)
    tasks = TieredImageNetTasks(env, "train", ways=4, shots=2, queries=6, seed=0)
    batch = tasks.sample(8)
    x = torch.from_numpy(png["train"]["images"].transpose(0, 3, 1, 2).copy())
    y = png["train"]["labels"]
    for t in range(8):
        for j in range(4):
            rows = tasks.last_indices[t, j]
            assert (y[rows.numpy()] == int(tasks.last_classes[t, j])).all()
            assert torch.equal(batch.query_x[t, 6 * j:6 * j + 6], x[rows[2:]].float() / 255)
    assert tasks.class_sizes.tolist() == [9, 12, 10, 11, 9, 14]  # unequal classes
    assert tasks.class_names[0] == f"class {ps.TIERED_IMAGENET['train'][0]} of train"
    with pytest.raises(ValueError, match="class 0 has only 9 examples"):
        TieredImageNetTasks(env, "train", shots=5, queries=5)


def test_bad_tiered_files(env, subset_ok, tmp_path):
    fx.tiered(env / "tiered-imagenet")
    folder = env / "tiered-imagenet"
    pngs = pickle.loads((folder / "test_images_png.pkl").read_bytes())
    pngs[3] = pngs[3][:40]  # a truncated PNG
    (folder / "test_images_png.pkl").write_bytes(pickle.dumps(pngs))
    with pytest.raises(DatasetIntegrityError, match="image 3 of .*test_images_png.pkl cannot be "
                                                    "decoded"):
        TieredImageNetTasks(env, "test")
    (folder / "test_images_png.pkl").write_bytes(pickle.dumps(pngs[:-1]))
    with pytest.raises(DatasetIntegrityError, match="holds 64 images, its labels 65"):
        TieredImageNetTasks(env, "test")
    npz_root = tmp_path / "npz"
    fx.tiered(npz_root / "tiered-imagenet", npz=True)
    npz = npz_root / "tiered-imagenet" / "val_images.npz"
    npz.write_bytes(npz.read_bytes()[:-70_000])  # truncated
    with pytest.raises(DatasetIntegrityError, match="val_images.npz is not a good"):
        TieredImageNetTasks(npz_root, "val")
    labels = folder / "val_labels.pkl"
    labels.write_bytes(labels.read_bytes()[:30])
    with pytest.raises(DatasetIntegrityError, match="val_labels.pkl is not a good"):
        TieredImageNetTasks(env, "val")


def test_tiered_without_the_hook_checks_the_published_counts(env):
    fx.tiered(env / "tiered-imagenet")
    with pytest.raises(DatasetIntegrityError, match="holds 6 of the 97 tieredImageNet val "
                                                    "classes"):
        TieredImageNetTasks(env, "val")


# -- CIFAR-FS and FC100 ---------------------------------------------------------------------
@pytest.mark.parametrize("archive", [False, True])
def test_cifar_decodes_train_then_test_in_file_order(env, subset_ok, archive):
    arrays = fx.cifar100(env / "cifar100", archive=archive)
    images, labels = cifar100.load_cifar100(env)
    want_x, want_y = fx.cifar_expected(arrays)
    assert torch.equal(images, torch.from_numpy(want_x))
    assert torch.equal(labels, torch.from_numpy(want_y))


def test_cifar_fs_and_fc100_keep_to_their_splits(env, subset_ok):
    fx.cifar100(env / "cifar100")
    for cls, split in ((CIFARFSTasks, ps.CIFAR_FS), (FC100Tasks, ps.FC100)):
        for s in ("train", "val", "test"):
            tasks = cls(env, s, ways=5, shots=2, queries=3, seed=2)
            assert tasks.class_names == list(split[s])  # all present, in the split's order
            batch = tasks.sample(20)
            assert batch.query_x.shape == (20, 15, 3, 32, 32)
            names = {ps.CIFAR100_CLASSES[int(c)] for c in tasks.last_classes.flatten()}
            assert names <= set(split[s])
    fc = FC100Tasks(env, "val", ways=20, shots=1, queries=1)
    fc.sample(10)
    supers = {s for s, cs in ps.CIFAR100_SUPERCLASSES.items()
              for c in fc.class_names if c in cs}
    assert supers == set(ps.FC100_SUPERCLASSES["val"])


def test_cifar_content_checks(env, subset_ok, monkeypatch):
    fx.cifar100(env / "cifar100", archive=True)
    tgz = env / "cifar100" / "cifar-100-python.tar.gz"
    good = tgz.read_bytes()
    tgz.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetIntegrityError, match="is not a good cifar-100-python.tar.gz") as e:
        CIFARFSTasks(env)
    assert "re-run with download=True" in str(e.value)
    tgz.write_bytes(good)
    monkeypatch.setattr(image_sets, "_ALLOW_SUBSET", False)  # the md5s are checked then
    with pytest.raises(DatasetIntegrityError, match="its train file has md5 .*, not the "
                                                    "published 16019d7e"):
        CIFARFSTasks(env)


def test_cifar_meta_with_other_names_is_refused(env, subset_ok):
    fx.cifar100(env / "cifar100")
    meta = env / "cifar100" / "cifar-100-python" / "meta"
    d = pickle.loads(meta.read_bytes())
    d[b"fine_label_names"][0] = b"aple"
    meta.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DatasetIntegrityError, match="does not name CIFAR-100's 100 classes"):
        FC100Tasks(env)


# -- the CIFAR-100 download, from a loopback server ------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        srv = self.server
        srv.requests.append(self.path)
        if srv.body is None:
            self.send_error(404)
            return
        body = srv.body[: len(srv.body) // 2] if srv.mode == "dropped" else srv.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(srv.body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    src = tmp_path / "served"
    fx.cifar100(src, archive=True)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # loopback only
    srv.body, srv.mode, srv.requests = (src / "cifar-100-python.tar.gz").read_bytes(), "ok", []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/cifar-100-python.tar.gz"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def test_download_verifies_then_renames(env, subset_ok, server, monkeypatch):
    monkeypatch.setenv("METALEARN_CIFAR100_URL", "http://127.0.0.1:9/closed")  # url= wins
    tasks = CIFARFSTasks(env, download=True, url=server.url, progress=False, queries=2)
    assert server.requests == ["/cifar-100-python.tar.gz"]
    assert sorted(p.name for p in (env / "cifar100").iterdir()) == ["cifar-100-python.tar.gz"]
    assert (env / "cifar100" / "cifar-100-python.tar.gz").read_bytes() == server.body
    assert tasks.sample(2).support_x.shape == (2, 5, 3, 32, 32)
    FC100Tasks(env, download=True, url=server.url, progress=False, queries=2)
    assert len(server.requests) == 1  # a present archive is not fetched again


@pytest.mark.parametrize("mode, error, text", [
    ("missing", DatasetDownloadError, "HTTP Error 404"),
    ("dropped", DatasetDownloadError, "stopped after"),
    ("corrupt", DatasetIntegrityError, "is not a good cifar-100-python.tar.gz"),
])
def test_a_failed_download_leaves_nothing(env, subset_ok, server, monkeypatch, mode, error,
                                          text):
    server.mode = mode
    if mode == "missing":
        server.body = None
    if mode == "corrupt":
        server.body = b"\x1f\x8b" + b"\x00" * 5000
    monkeypatch.setenv("METALEARN_CIFAR100_URL", server.url)  # the environment variable is used
    with pytest.raises(error, match=text) as err:
        cifar100.download(env, progress=False)
    assert "nothing was saved" in str(err.value) and server.url in str(err.value)
    folder = env / "cifar100"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_missing_cifar_says_download(env):
    with pytest.raises(DatasetNotFoundError, match="pass download=True") as err:
        FC100Tasks(env)
    assert str(env / "cifar100") in str(err.value)
