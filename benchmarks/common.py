"""Shared by the benchmark scripts: timing, result headers, atomic JSON output, and the
record of how much of a long run's time other processes used the CPU."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from metalearn.checkpoint import atomic_write
from metalearn.run_record import run_header

RESULTS = Path(__file__).parent / "results"
# Beside a checkout of this project, ../shared/data holds the Omniglot zips (as in CI).
_SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if "METALEARN_DATA" not in os.environ and (_SHARED / "omniglot").is_dir():
    os.environ["METALEARN_DATA"] = str(_SHARED)


def omniglot_5w1s_batch(queries: int, meta_batch: int = 32):
    """The speed and memory workload's tasks: Omniglot 5-way 1-shot, train split, seed 0."""
    from metalearn.data import OmniglotTasks

    return OmniglotTasks(split="train", ways=5, shots=1, queries=queries, seed=0,
                         progress=False).sample(meta_batch)


def seeded_conv4_learner(algorithm: str, steps: int, inner_lr: float = 0.4,
                         filters: int = 64):
    """(model, learner): Conv4 (``filters`` per layer) with the seed-0 initial weights, under
    MAML, FOMAML, Reptile or ANIL."""
    from metalearn import ANIL, FOMAML, MAML, Reptile
    from metalearn.models import Conv4

    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=filters)
    return model, {"maml": MAML, "fomaml": FOMAML, "reptile": Reptile, "anil": ANIL}[algorithm](
        model, inner_lr, steps)


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def interleaved_medians(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Median wall time of each ``fns[name]()``, the calls taking turns round by round.

    Taking turns spreads a slow spell of this shared machine over all the candidates
    instead of one, so that their ratio is steadier than that of back-to-back blocks.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a float32 ``size`` x ``size`` matmul: the machine's reachable peak, measured
    in the run that reports fractions of it."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats=repeats, warmup=2) / 1e9


def conv_peak_gflops(repeats: int = 5) -> float:
    """GFLOP/s of a large dense 3x3 convolution forward (64 x 256 channels x 16², padding 1).

    A second reference next to :func:`matmul_peak_gflops`: on this machine's AMD CPU, torch's
    MKL matmul runs at about 210 GFLOP/s while oneDNN's direct AVX-512 convolutions reach
    twice that, so the matmul rate understates what the convolution kernels can do.
    """
    x, w = torch.randn(64, 256, 16, 16), torch.randn(256, 256, 3, 3)
    flops = 2 * x.numel() * 256 * 9
    return flops / median_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1),
                                  repeats=repeats, warmup=2) / 1e9


SPEED_ENVIRONMENT = ("GLIBC_TUNABLES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD")


def header(seed: int | None = None) -> dict:
    """Command, commit, machine and versions, with the script's own command line."""
    h = run_header()
    h["command"] = " ".join(["python", *sys.argv])
    h["seed"] = seed
    # Settings that change the speed of the same code (the allocator, thread counts).
    h["environment"] = {k: os.environ[k] for k in SPEED_ENVIRONMENT if k in os.environ}
    return h


def write_json(name: str, payload: dict) -> Path:
    """Write ``payload`` to benchmarks/results/<name>, atomically."""
    path = RESULTS / name
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    return path


# -- statistics across seeds --------------------------------------------------------------
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


def t95(df: int) -> float:
    """Two-sided 95% Student-t quantile (scipy is not a dependency): the table to 10 degrees
    of freedom, then a Cornish-Fisher expansion (within 0.003 of the exact value)."""
    if df in _T95:
        return _T95[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float]) -> dict:
    """Mean, sample std (ddof 1) and the t-based 95% CI half-width (None below 2 values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "ci95": t95(n - 1) * std / math.sqrt(n)}


def paired(a: dict, b: dict) -> dict:
    """``a - b`` over the seeds both have (``{seed: value}``): mean, 95% t-interval, seeds."""
    seeds = sorted(set(a) & set(b))
    out = mean_ci([a[s] - b[s] for s in seeds])
    out["seeds"] = seeds
    if out["ci95"] is not None:
        out["low"], out["high"] = out["mean"] - out["ci95"], out["mean"] + out["ci95"]
    return out


# -- sharing the CPU: long runs record how much of their time others used it ---------------
# A minute in which other processes used more than this many cores counts as shared.
SHARED_CORES = 0.25


class CpuMonitor(threading.Thread):
    """Once a minute, append how many cores this process and all others used (Linux)."""

    def __init__(self, path: Path, period: float = 60.0):
        super().__init__(daemon=True)
        self.path, self.period = path, period
        self.ticks = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy() -> int:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    @staticmethod
    def _own() -> int:
        """CPU ticks of this process and its descendants (a study's workers, and their
        compiler processes, are its own work, not other processes'): utime + stime of
        every thread, and cutime + cstime for the children already gone."""
        def ticks(stat: str) -> tuple[int, int]:
            fields = stat.rsplit(")", 1)[1].split()
            return int(fields[1]), sum(int(x) for x in fields[11:15])  # ppid, times

        children: dict[int, list[tuple[int, int]]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid, t = ticks((entry / "stat").read_text())
                except (OSError, IndexError, ValueError):  # gone meanwhile
                    continue
                children.setdefault(ppid, []).append((int(entry.name), t))
        total = ticks(Path("/proc/self/stat").read_text())[1]
        todo = [os.getpid()]
        while todo:
            for pid, t in children.get(todo.pop(), []):
                total += t
                todo.append(pid)
        return total

    def run(self) -> None:
        if not Path("/proc/stat").exists():
            return
        busy, own, t = self._busy(), self._own(), time.monotonic()
        while True:
            time.sleep(self.period)
            busy2, own2, t2 = self._busy(), self._own(), time.monotonic()
            elapsed = t2 - t
            own_cores = max(own2 - own, 0) / self.ticks / elapsed
            other = max((busy2 - busy) / self.ticks / elapsed - own_cores, 0.0)
            record = {"utc": utc_now(),
                      "seconds": round(elapsed, 1), "own_cores": round(own_cores, 3),
                      "other_cores": round(other, 3)}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            busy, own, t = busy2, own2, t2


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a last line cut short by a kill
            continue
    return rows


def shared_share(cpu: list[dict]) -> float | None:
    """The share of the monitored wall-clock in which other processes used the CPU."""
    total = sum(r["seconds"] for r in cpu)
    if not total:
        return None
    return sum(r["seconds"] for r in cpu if r["other_cores"] > SHARED_CORES) / total


def utc_now() -> str:
    """The time now, UTC, as the CPU monitor writes it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cpu_shared_within(cpu: list[dict], segments: list[list[str]]) -> float | None:
    """:func:`~benchmarks.common.shared_share` of the monitored minutes that ended within
    the run's ``segments`` (``[start, end]`` UTC, one per process that trained it)."""
    spans = [(datetime.fromisoformat(a), datetime.fromisoformat(b)) for a, b in segments]
    return shared_share([r for r in cpu if any(a <= datetime.fromisoformat(r["utc"]) <= b
                                               for a, b in spans)])


def start_worker(malloc_reuse: bool = False) -> None:
    """Set up a study's worker process (``--workers``): one torch thread, as the workers
    share the cores; glibc's allocator keeping freed memory if the study's process does
    (:func:`metalearn.allocator.reuse_freed_memory`); and an end with the study's process,
    so that stopping the study stops its runs (Linux)."""
    import torch

    torch.set_num_threads(1)
    if malloc_reuse:
        from metalearn.allocator import reuse_freed_memory

        reuse_freed_memory()
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_pool(workers: int, malloc_reuse: bool = False):
    """The pool a study's ``--workers`` runs its runs in: fresh (spawned) processes set up
    by :func:`start_worker`."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                               initializer=start_worker, initargs=(malloc_reuse,))
