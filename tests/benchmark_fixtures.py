"""Small copies of the benchmarks in their real file formats, written by the tests.

Each holds a few classes of the published split (real class names) with a few images
each, in the layouts and pickle formats of the real distributions; the loaders accept
them only with ``image_sets._ALLOW_SUBSET`` set (the ``subset_ok`` fixture).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from metalearn.data.published_splits import (
    CIFAR100_CLASSES,
    CIFAR100_SUPERCLASSES,
    MINI_IMAGENET,
    TIERED_IMAGENET,
)

SPLITS = ("train", "val", "test")


def images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) smooth random images (they survive JPEG roughly)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(b).resize((size, size),
                                                          Image.Resampling.BILINEAR))
                     for b in base])


def mini_pickles(folder: Path, classes: int = 6, per_class: int = 20) -> dict[str, dict]:
    """``mini-imagenet-cache-{train,validation,test}.pkl`` as learn2learn reads them; the
    images of a class are interleaved with others' (class_dict indices, not blocks)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, split in enumerate(SPLITS):
        names = MINI_IMAGENET[split][:classes]
        n = classes * per_class
        data = images(n, 84, seed=i)
        order = np.random.default_rng(10 + i).permutation(n)
        class_dict = {c: order[j::classes].tolist() for j, c in enumerate(names)}
        d = {"image_data": data, "class_dict": class_dict}
        name = "validation" if split == "val" else split
        with open(folder / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump(d, f, protocol=4)
        out[split] = d
    return out


def mini_csv(folder: Path, classes: int = 6, per_class: int = 20, size: int = 40,
             nested: bool = False) -> dict[str, list[tuple[str, str]]]:
    """``{split}.csv`` and ``images/`` (JPEGs of ``size`` px, so they are resized to 84),
    as in Ravi & Larochelle's release; ``nested``: one folder per synset."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = {}
    for i, split in enumerate(SPLITS):
        rows = []
        pics = images(classes * per_class, size, seed=20 + i)
        for j, c in enumerate(MINI_IMAGENET[split][:classes]):
            for k in range(per_class):
                name = f"{c}{k * 7 + 1:08d}.jpg"
                target = folder / "images" / (c if nested else "") / name
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pics[j * per_class + k]).save(target, quality=95)
                rows.append((name, c))
        (folder / f"{split}.csv").write_text(
            "filename,label\n" + "".join(f"{a},{b}\n" for a, b in rows))
        out[split] = rows
    return out


def tiered(folder: Path, sizes=(9, 12, 10, 11, 9, 14), npz: bool = False) -> dict[str, dict]:
    """``{split}_labels.pkl`` with ``{split}_images_png.pkl`` (PNG bytes as uint8 arrays,
    as OpenCV's imencode gives them), or ``{split}_images.npz`` (BGR, as OpenCV wrote it).
    Classes of unequal sizes, images in shuffled order, Python-2-style bytes keys."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, split in enumerate(SPLITS):
        labels = np.repeat(np.arange(len(sizes)), sizes)
        labels = labels[np.random.default_rng(30 + i).permutation(len(labels))]
        rgb = images(len(labels), 84, seed=40 + i)
        names = [f"class {c} of {split}" for c in TIERED_IMAGENET[split][: len(sizes)]]
        meta = {b"label_specific": labels.astype(np.int32),
                b"label_general": np.zeros(len(labels), np.int32),
                b"label_specific_str": names, b"label_general_str": ["category"]}
        with open(folder / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(meta, f, protocol=2)
        if npz:
            np.savez(folder / f"{split}_images.npz", images=rgb[..., ::-1])
        else:
            pngs = []
            for im in rgb:
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                pngs.append(np.frombuffer(buf.getvalue(), np.uint8))
            with open(folder / f"{split}_images_png.pkl", "wb") as f:
                pickle.dump(pngs, f, protocol=4)
        out[split] = {"labels": labels, "images": rgb, "names": names}
    return out


def cifar100(folder: Path, train: int = 6, test: int = 2, archive: bool = False) -> dict:
    """``cifar-100-python/{train,test,meta}`` (bytes keys, as the Python 2 originals), all
    100 classes with ``train`` + ``test`` images each; ``archive``: as the .tar.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    super_of = {c: s for s, cs in CIFAR100_SUPERCLASSES.items() for c in cs}
    supers = sorted(CIFAR100_SUPERCLASSES)
    files, arrays = {}, {}
    for part, per in (("train", train), ("test", test)):
        fine = np.tile(np.arange(100), per)
        fine = fine[np.random.default_rng(50 if part == "train" else 51).permutation(len(fine))]
        data = images(len(fine), 32, seed=60 if part == "train" else 61)
        flat = data.transpose(0, 3, 1, 2).reshape(len(fine), -1)  # R, G, B planes
        coarse = [supers.index(super_of[CIFAR100_CLASSES[f]]) for f in fine]
        files[part] = pickle.dumps({b"data": flat, b"fine_labels": fine.tolist(),
                                    b"coarse_labels": coarse, b"batch_label": part.encode(),
                                    b"filenames": [b"x.png"] * len(fine)}, protocol=2)
        arrays[part] = (data, fine)
    files["meta"] = pickle.dumps({b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES],
                                  b"coarse_label_names": [s.encode() for s in supers]},
                                 protocol=2)
    if archive:
        with tarfile.open(folder / "cifar-100-python.tar.gz", "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        (folder / "cifar-100-python").mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / "cifar-100-python" / name).write_bytes(data)
    return arrays


def cifar_expected(arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    """The loader's expected (images (n, 3, 32, 32), labels): train then test, file order."""
    x = np.concatenate([arrays["train"][0], arrays["test"][0]]).transpose(0, 3, 1, 2)
    y = np.concatenate([arrays["train"][1], arrays["test"][1]])
    return x, y
