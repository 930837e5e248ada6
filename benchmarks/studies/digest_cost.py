"""What the content digests of checkpoints and caches cost (docs/faults.md).

    python benchmarks/studies/digest_cost.py [--repeats 21]

Checkpoints: a Conv4 5-way checkpoint with its Adam state (as ``metalearn train`` writes
it), saved and loaded with the library (digest and finiteness check) against plain
atomic ``torch.save`` / ``torch.load``. Caches: an array of the decoded Omniglot cache's
size (32,460 images of 28x28 bytes, 25 MB) saved and loaded with ``save_array`` /
``load_array`` (crc32 digest) against plain ``np.save`` / ``np.load``, from the page
cache. Each pair takes turns, round by round; medians in ms. Run on an idle machine.
Writes benchmarks/results/digest_cost.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import header, interleaved_medians, write_json  # noqa: E402
from metalearn.checkpoint import (  # noqa: E402
    atomic_write,
    load_checkpoint,
    non_finite_entries,
    save_checkpoint,
    state_digest,
)
from metalearn.data.array_cache import array_digest, load_array, save_array  # noqa: E402
from metalearn.models import Conv4  # noqa: E402


def checkpoint_state() -> dict:
    torch.manual_seed(0)
    model = Conv4(ways=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"format": 2, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "learner": {}, "iteration": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    ms = {}
    state = checkpoint_state()
    images = np.random.default_rng(0).integers(0, 256, (32460, 28, 28), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, guarded = tmp / "plain.pt", tmp / "guarded.pt"
        t = interleaved_medians({
            "checkpoint digest alone": lambda: state_digest(state),
            "checkpoint finiteness check alone": lambda: non_finite_entries(state),
            "save checkpoint, plain": lambda: atomic_write(plain,
                                                           lambda f: torch.save(state, f)),
            "save checkpoint, with digest": lambda: save_checkpoint(guarded, state),
        }, args.repeats)
        ms.update(t)
        t = interleaved_medians({
            "load checkpoint, plain": lambda: torch.load(plain, weights_only=True),
            "load checkpoint, checked": lambda: load_checkpoint(guarded),
        }, args.repeats)
        ms.update(t)
        checkpoint_bytes = guarded.stat().st_size
        plain_npy, guarded_npy = tmp / "plain.npy", tmp / "guarded.npy"
        t = interleaved_medians({
            "cache crc32 alone": lambda: array_digest(images),
            "save cache, plain": lambda: atomic_write(
                plain_npy, lambda f: np.save(f, images, allow_pickle=False)),
            "save cache, with digest": lambda: save_array(guarded_npy, images),
        }, max(args.repeats // 3, 3))
        ms.update(t)
        t = interleaved_medians({
            "load cache, plain": lambda: np.load(plain_npy),
            "load cache, checked": lambda: load_array(guarded_npy, images.shape, images.dtype),
        }, args.repeats)
        ms.update(t)
    ms = {k: 1000 * v for k, v in ms.items()}
    for k, v in ms.items():
        print(f"{k:38s} {v:8.2f} ms")
    h = header()
    h.update(repeats=args.repeats, checkpoint_bytes=checkpoint_bytes, cache_bytes=images.nbytes)
    print(f"wrote {write_json('digest_cost.json', {'header': h, 'median_ms': ms})}")


if __name__ == "__main__":
    main()
