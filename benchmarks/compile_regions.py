"""What ``torch.compile`` of the first-order regions buys, what it costs, and when it pays off.

    python benchmarks/compile_regions.py [--repeats 7] [--only NAME ...] [--out FILE]

For each workload, the library's eager path (``kernel_settings(compile=False)``) and the
compiled one (``compile=True``, :mod:`metalearn.kernels.compiled`) take turns on the same
batch, in blocks of calls (three rounds; ``eager_before_compiling_seconds`` is the eager
path timed before the workload compiles, a check that compiled code in the process does
not slow it): the median seconds per call of each, their ratio, the first call's time with an
empty compile cache (what a new machine pays, inductor's cache in a fresh folder) and with a
warm one (a later process on the same machine), and the call from which compiling has paid
for itself: ``(first_call_cold - eager) / (eager - compiled)``. A parity check runs too:
the relative difference of the accumulated ``.grad`` (or the adapted weights) between the
paths, from the same weights and mini-batches, and of each from the eager path in float64
(float32's own rounding, which ReLU's kink makes large on Omniglot, is the yardstick).

Workloads (Omniglot, Conv4 with 64 filters):

* ``fomaml5_a``/``_b`` and ``reptile5_a``/``_b``: benchmarks/peers/speed.py's, 5w1s,
  meta-batch 32, 5 inner SGD steps at 0.4, (a) 1 and (b) 15 queries per class;
* ``reptile_s6_k4``/``_k8``: the Reptile section 6 studies (benchmarks/reptile_ablations.py):
  5-way, a pool of 20 drawings per class, meta-batch 1, k SGD steps at 0.003 on cycled
  mini-batches of 25; ``fomaml_s6_k8``: the same with shared-tail FOMAML
  (``GradientCombination(use="last")``);
* ``reptile_repro``: benchmarks/reproduce_omniglot.py's Reptile 5w1s: meta-batch 5, 10
  train shots, 5 inner Adam steps at 1e-3 (beta1 0) on batches of 10;
* ``eval_adapt``: evaluation's adaptation, 32 tasks 5w1s, 10 SGD steps at 0.4
  (``learner.adapt``).

For ``fomaml5_a`` it also checks the compiled path in float64 against the eager one, and both
paths in float32 with GELU in place of the ReLUs (``exactness_fomaml5_a``): with ReLU, float32
gates that flip where a pre-activation lies within round-off of zero can separate the two
paths' float32 results far more than their rounding (benchmarks/studies/float32_relu_kinks.py).

Second-order MAML is not compiled (its support forward must stay on the exact Functions),
so it has no row. Run on an idle machine; writes benchmarks/results/compile_regions.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Inductor's cache in an empty folder (again before each workload): cold first calls.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import header, write_json  # noqa: E402
from metalearn import FOMAML, GradientCombination, Reptile  # noqa: E402
from metalearn.data import OmniglotTasks, TaskBatch  # noqa: E402
from metalearn.kernels import kernel_settings  # noqa: E402
from metalearn.models import Conv4  # noqa: E402


def tasks(ways: int, shots: int, queries: int, meta_batch: int):
    return OmniglotTasks(split="train", ways=ways, shots=shots, queries=queries, seed=0,
                         progress=False).sample(meta_batch)


def workloads() -> dict:
    """name -> (description, make_learner(model), batch, call(learner, batch))."""
    step = lambda learner, batch: learner.step(batch)  # noqa: E731

    def adapt(learner, batch):
        return learner.adapt(batch.support_x, batch.support_y, steps=10)

    # The section 6 studies' shared-tail tasks: the pool of 20 drawings per class is the
    # support set (benchmarks/reptile_ablations.py).
    b = tasks(5, 19, 1, 1)
    s6 = TaskBatch(torch.cat([b.support_x, b.query_x], 1), torch.cat([b.support_y, b.query_y], 1),
                   b.query_x, b.query_y)
    return {
        "fomaml5_a": ("FOMAML 5 steps, 5w1s, 1 query/class, meta-batch 32",
                      lambda m: FOMAML(m, 0.4, 5), tasks(5, 1, 1, 32), step),
        "fomaml5_b": ("FOMAML 5 steps, 5w1s, 15 queries/class, meta-batch 32",
                      lambda m: FOMAML(m, 0.4, 5), tasks(5, 1, 15, 32), step),
        "reptile5_a": ("Reptile 5 steps, 5w1s, 1 query/class, meta-batch 32",
                       lambda m: Reptile(m, 0.4, 5), tasks(5, 1, 1, 32), step),
        "reptile5_b": ("Reptile 5 steps, 5w1s, 15 queries/class, meta-batch 32",
                       lambda m: Reptile(m, 0.4, 5), tasks(5, 1, 15, 32), step),
        "reptile_s6_k4": ("Reptile k=4, SGD 0.003, batches of 25 from 5x20, meta-batch 1",
                          lambda m: Reptile(m, 0.003, 4, inner_batch=25), s6, step),
        "reptile_s6_k8": ("Reptile k=8, SGD 0.003, batches of 25 from 5x20, meta-batch 1",
                          lambda m: Reptile(m, 0.003, 8, inner_batch=25), s6, step),
        "fomaml_s6_k8": ("shared-tail FOMAML k=8 (use='last'), else as k8",
                         lambda m: GradientCombination(m, 0.003, 8, use="last", inner_batch=25),
                         s6, step),
        "reptile_repro": ("Reptile 5w1s reproduction: 5 Adam steps at 1e-3 on batches of 10 "
                          "of 10 shots, meta-batch 5",
                          lambda m: Reptile(m, 1e-3, 5, inner_batch=10, inner_optimizer="adam"),
                          tasks(5, 10, 1, 5), step),
        "eval_adapt": ("evaluation's adaptation: 10 SGD steps at 0.4, 32 tasks 5w1s",
                       lambda m: FOMAML(m, 0.4, 1), tasks(5, 1, 1, 32), adapt),
    }


def block_medians(fns: dict, repeats: int, rounds: int = 3) -> dict:
    """Median seconds per call of each ``fns[name]()``, in rounds of a block of calls per
    candidate (the first call of each block untimed): the compiled kernels' and ATen's
    OpenMP threads would otherwise share each call's start, where they still spin, which
    single alternating calls would charge to the other path."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(max(1, round(repeats / rounds))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def fresh_learner(make):
    torch.manual_seed(0)
    learner = make(Conv4(ways=5))
    learner.generator = torch.Generator().manual_seed(0)
    return learner


def parity(make, batch, call) -> dict:
    """How far the compiled path's result (the accumulated .grad, or the adapted weights)
    is from the eager one, and both from the eager path in float64 (float32's own rounding,
    the yardstick), over all parameters together: ||a - b|| / ||b||. (Per tensor it would
    divide by zero for the convolution biases in front of BatchNorm, whose true gradient is
    0 and whose computed one is rounding noise.)"""
    def result(on: bool, dtype: torch.dtype) -> torch.Tensor:
        learner = fresh_learner(make).to(dtype)
        with kernel_settings(compile=on):
            out = call(learner, batch.to("cpu", dtype))
        if isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values()):
            return torch.cat([v.detach().flatten() for v in out.values()]).double()
        return torch.cat([p.grad.flatten() for p in learner.model.parameters()]).double()

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    eager, comp, exact = result(False, torch.float32), result(True, torch.float32), \
        result(False, torch.float64)
    return {"compiled_vs_eager": distance(comp, eager),
            "compiled_vs_float64": distance(comp, exact),
            "eager_vs_float64": distance(eager, exact)}


def exactness(make, batch, call) -> dict:
    """Why the float32 distances can differ: the compiled path in float64 against the eager
    one (the same function to round-off?), and both paths in float32 with GELU in place of
    Conv4's ReLUs (a float32 difference from ReLU's kink, where a pre-activation within
    round-off of zero flips its gate, is gone with a smooth activation)."""
    def vector(on: bool, dtype: torch.dtype, gelu: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = Conv4(ways=5)
        if gelu:
            for name, module in list(model.features.named_children()):
                if isinstance(module, torch.nn.ReLU):
                    setattr(model.features, name, torch.nn.GELU())
        learner = make(model).to(dtype)
        with kernel_settings(compile=on):
            call(learner, batch.to("cpu", dtype))
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    exact = vector(False, torch.float64, False)
    exact_gelu = vector(False, torch.float64, True)
    return {"compiled_float64_vs_eager_float64": distance(vector(True, torch.float64, False),
                                                          exact),
            "gelu_compiled_float32_vs_float64": distance(vector(True, torch.float32, True),
                                                         exact_gelu),
            "gelu_eager_float32_vs_float64": distance(vector(False, torch.float32, True),
                                                      exact_gelu)}


def measure(name: str, make, batch, call, repeats: int) -> dict:
    # An empty inductor cache for this workload's cold first call.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    out = {}
    learner = fresh_learner(make)

    def once(on: bool):
        def run():
            learner.zero_grad(set_to_none=True)
            with kernel_settings(compile=on):
                call(learner, batch)
        return run

    # Eager before anything of this workload compiles, as a check on the blocks below.
    out["eager_before_compiling_seconds"] = block_medians({"eager": once(False)},
                                                          max(3, repeats // 2))["eager"]
    torch._dynamo.reset()
    learner._compiled = {}
    t0 = time.perf_counter()
    once(True)()
    out["first_call_cold_seconds"] = time.perf_counter() - t0
    # A later process: dynamo starts over, inductor's on-disk cache is warm.
    torch._dynamo.reset()
    learner._compiled = {}
    t0 = time.perf_counter()
    once(True)()
    out["first_call_warm_seconds"] = time.perf_counter() - t0
    out["parity_relative_difference"] = parity(make, batch, call)
    med = block_medians({"eager": once(False), "compiled": once(True)}, repeats)
    out["eager_seconds"], out["compiled_seconds"] = med["eager"], med["compiled"]
    out["speedup"] = med["eager"] / med["compiled"]
    saved = med["eager"] - med["compiled"]
    for which in ("cold", "warm"):
        extra = out[f"first_call_{which}_seconds"] - med["eager"]
        out[f"pays_off_after_calls_{which}"] = (round(extra / saved) if saved > 0 else None)
    print(f"{name}: eager {med['eager'] * 1e3:.1f} ms, compiled {med['compiled'] * 1e3:.1f} ms "
          f"({out['speedup']:.2f}x); first call {out['first_call_cold_seconds']:.0f} s cold, "
          f"{out['first_call_warm_seconds']:.0f} s warm; pays off after "
          f"{out['pays_off_after_calls_cold']} calls (cold); from float64: compiled "
          f"{out['parity_relative_difference']['compiled_vs_float64']:.1e}, eager "
          f"{out['parity_relative_difference']['eager_vs_float64']:.1e}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per path (default 7)")
    parser.add_argument("--only", nargs="+", default=None, help="workloads to run (default all)")
    parser.add_argument("--out", default="compile_regions.json",
                        help="result file under benchmarks/results/ (default compile_regions.json)")
    args = parser.parse_args()
    all_workloads = workloads()
    names = args.only or list(all_workloads)
    unknown = sorted(set(names) - set(all_workloads))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {sorted(all_workloads)}")
    h = header(seed=0)  # at the start: the code that runs, even if the tree changes meanwhile
    rows = []
    for name in names:
        description, make, batch, call = all_workloads[name]
        rows.append({"workload": name, "setup": description,
                     **measure(name, make, batch, call, args.repeats)})
    payload = {**h, "benchmark": "compile_regions", "results": rows}
    if "fomaml5_a" in names:
        _, make, batch, call = all_workloads["fomaml5_a"]
        payload["exactness_fomaml5_a"] = exactness(make, batch, call)
        print("exactness, fomaml5_a:", payload["exactness_fomaml5_a"], flush=True)
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
