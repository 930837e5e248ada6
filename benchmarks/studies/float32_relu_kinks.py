"""Where float32 meta-gradients jump: ReLU pre-activations that round across zero.

    python benchmarks/studies/float32_relu_kinks.py [--seeds 30] [--cases maml-1 fomaml-5]

Omniglot 5-way 1-shot, 1 query per class, Conv4, meta-batch 32, inner lr 0.4 (the
learn2learn parity setup at (a)). For each seed, the float32 meta-gradient of metalearn's
batched path and of the plain per-task loop (tests/reference.py, the way learn2learn
computes it) are compared with the float64 loop's: max|a - b| / max|b| over the parameters,
leaving out the conv biases before BatchNorm (their true gradient is 0). The same is done
with Conv4's ReLUs swapped for GELU, which is smooth. If float32 errors far above round-off
come from ReLU gates that flip where a pre-activation lies within round-off of zero, they
show up with ReLU, in either implementation, and not with GELU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import header, write_json  # noqa: E402
from metalearn import FOMAML, MAML  # noqa: E402
from metalearn.data import OmniglotTasks  # noqa: E402
from metalearn.models import Conv4  # noqa: E402
from tests.reference import maml_loop  # noqa: E402

PRE_BN_BIASES = {"features.0.bias", "features.3.bias", "features.6.bias", "features.9.bias"}
# 100x the typical float32 error of these meta-gradients (about 1e-6 to 1e-5).
SPIKE = 1e-4


def model(seed: int, activation: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    net = Conv4(ways=5)
    if activation == "gelu":
        for i, m in enumerate(net.features):
            if isinstance(m, nn.ReLU):
                net.features[i] = nn.GELU()
    return net.to(dtype)


def rel_error(a: dict, b: dict) -> float:
    names = [k for k in b if k not in PRE_BN_BIASES]
    return (max((a[k] - b[k]).abs().max().item() for k in names)
            / max(b[k].abs().max().item() for k in names))


def errors(seed: int, algorithm: str, steps: int, activation: str) -> dict:
    batch = OmniglotTasks(split="train", ways=5, shots=1, queries=1, seed=seed,
                          progress=False).sample(32)
    first_order = algorithm == "fomaml"
    grads = {}
    for dtype in (torch.float32, torch.float64):
        net, b = model(seed, activation, dtype), batch.to("cpu", dtype=dtype)
        (FOMAML if first_order else MAML)(net, 0.4, steps).step(b)
        ours = {n: p.grad.double() for n, p in net.named_parameters()}
        _, loop = maml_loop(net, b, 0.4, steps, first_order=first_order)
        grads[dtype] = ours, {k: v.double() for k, v in loop.items()}
    reference = grads[torch.float64][1]
    return {"seed": seed,
            "metalearn_float32": rel_error(grads[torch.float32][0], reference),
            "loop_float32": rel_error(grads[torch.float32][1], reference),
            "metalearn_float64": rel_error(grads[torch.float64][0], reference)}


def summary(rows: list[dict]) -> dict:
    def spikes(key):
        return [r["seed"] for r in rows if r[key] > SPIKE]

    ours, loop = spikes("metalearn_float32"), spikes("loop_float32")
    calm = [r["metalearn_float32"] / r["loop_float32"] for r in rows
            if r["seed"] not in ours and r["seed"] not in loop]
    return {
        "spike_seeds_metalearn": ours, "spike_seeds_loop": loop,
        "spike_seeds_both": sorted(set(ours) & set(loop)),
        "median_metalearn_float32": statistics.median(r["metalearn_float32"] for r in rows),
        "median_loop_float32": statistics.median(r["loop_float32"] for r in rows),
        "median_ratio_without_spikes": statistics.median(calm) if calm else None,
        "worst_metalearn_float64": max(r["metalearn_float64"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30, help="seeds 0 .. N-1")
    parser.add_argument("--cases", nargs="+", default=["maml-1", "fomaml-5"],
                        choices=["maml-1", "maml-5", "fomaml-5"])
    parser.add_argument("--out", default="float32_relu_kinks.json", help="results file name")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    results = []
    for case in args.cases:
        algorithm, steps = case.split("-")
        for activation in ("relu", "gelu"):
            rows = [errors(s, algorithm, int(steps), activation)
                    for s in tqdm(range(args.seeds), desc=f"{case} {activation}")]
            s = summary(rows)
            results.append({"case": case, "activation": activation, "summary": s,
                            "per_seed": rows})
            print(f"{case:9s} {activation}: spikes (> {SPIKE:.0e}) metalearn "
                  f"{len(s['spike_seeds_metalearn'])}/{args.seeds} "
                  f"{s['spike_seeds_metalearn']}, loop {len(s['spike_seeds_loop'])}/"
                  f"{args.seeds} {s['spike_seeds_loop']}; median error metalearn "
                  f"{s['median_metalearn_float32']:.1e}, loop {s['median_loop_float32']:.1e}")
    path = write_json(args.out, {
        **header(), "benchmark": "float32_relu_kinks",
        "metric": "max|g - g_float64_loop| / max|g_float64_loop| over the meta-gradient, "
                  "pre-BatchNorm conv biases left out",
        "setup": "Omniglot 5w1s, 1 query/class, Conv4, meta-batch 32, inner lr 0.4, train "
                 "split; sampler and init seeded by the seed",
        "spike_threshold": SPIKE, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
