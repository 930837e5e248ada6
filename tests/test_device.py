"""Every learner on one device against the CPU: ``METALEARN_TEST_DEVICE`` picks it (default:
CUDA when there is one, else the CPU, where these run as plain tests).

``benchmarks/gpu_check.py`` runs this file on a GPU machine. The references are
independent of the device under test: the per-task loop of ``tests/reference.py`` and the
same learner on the CPU, all in float64.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from metalearn import ANIL, FOMAML, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile, evaluate
from metalearn.data import TaskBatch
from metalearn.memory import memory_profile
from metalearn.models import Conv4
from tests.reference import maml_loop

DEVICE = torch.device(os.environ.get("METALEARN_TEST_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
LEARNERS = {
    "maml": lambda m: MAML(m, 0.4, 2),
    "maml-memory-saving": lambda m: MAML(m, 0.4, 2, memory_saving=True),
    "fomaml": lambda m: FOMAML(m, 0.4, 2),
    "metasgd": lambda m: MetaSGD(m, 0.4, 1),
    "anil": lambda m: ANIL(m, 0.4, 2),
    "mamlpp": lambda m: MAMLPlusPlus(m, 0.4, 2),
    "imaml": lambda m: IMAML(m, 0.1, 4, lam=2.0, cg_steps=3),
    "reptile": lambda m: Reptile(m, 0.1, 3, inner_batch=4,
                                 generator=torch.Generator().manual_seed(0)),
}


def small_conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4(ways=5, hidden=8).double()


def image_batch(tasks: int = 3, shots: int = 1, queries: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(1)

    def images(per_class: int) -> torch.Tensor:
        return torch.rand(tasks, 5 * per_class, 1, 28, 28, generator=g, dtype=torch.float64)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(5).repeat_interleave(per_class).repeat(tasks, 1)

    return TaskBatch(images(shots), labels(shots), images(queries), labels(queries))


def stepped(name: str, device: torch.device) -> dict[str, torch.Tensor]:
    model = small_conv4().to(device)
    learner = LEARNERS[name](model).to(device)
    batch = image_batch(shots=5 if name == "reptile" else 1).to(device)
    learner.step(batch)
    # (MAML++ leaves the model's own BatchNorm affine unused: per-step rows replace it.)
    return {n: p.grad.cpu() for n, p in learner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_meta_gradient_on_the_device_equals_the_cpu(name):
    on_device, on_cpu = stepped(name, DEVICE), stepped(name, torch.device("cpu"))
    assert on_device.keys() == on_cpu.keys()
    for n, g in on_cpu.items():
        torch.testing.assert_close(on_device[n], g, rtol=1e-8, atol=1e-10)


def test_maml_on_the_device_equals_the_per_task_loop():
    model = small_conv4()
    batch = image_batch()
    _, reference = maml_loop(model, batch, 0.4, 2)
    model.to(DEVICE)
    MAML(model, 0.4, 2).step(batch.to(DEVICE))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), reference[n], rtol=1e-9, atol=1e-12)


def test_evaluation_on_the_device_equals_the_cpu():
    batch = image_batch(tasks=4)
    results = []
    for device in (DEVICE, torch.device("cpu")):
        model = small_conv4().to(device)
        results.append(evaluate(MAML(model, 0.4, 1), batch.to(device), max_steps=3,
                                progress=False).per_task)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-9)


def test_memory_profile_on_the_device():
    model = small_conv4().float().to(DEVICE)
    batch = image_batch().to(DEVICE, dtype=torch.float32)
    rows = memory_profile(MAML(model, 0.4, 1), batch, inner_steps=(1, 3), repeats=1)
    assert rows[1]["saved_bytes"] > rows[0]["saved_bytes"]  # MAML's graph grows
    if DEVICE.type == "cuda":
        assert rows[1]["cuda_peak_bytes"] > rows[0]["cuda_peak_bytes"] > 0
    else:
        assert rows[0]["cuda_peak_bytes"] is None


def test_train_and_resume_on_the_device(tmp_path):
    import metalearn

    common = dict(dataset="sine", device=str(DEVICE), val_every=5, val_tasks=4,
                  progress=False, meta_batch=4)
    whole = metalearn.train(iterations=10, checkpoint=tmp_path / "a.pt", **common)
    metalearn.train(iterations=5, checkpoint=tmp_path / "b.pt", **common)
    resumed = metalearn.train(iterations=10, checkpoint=tmp_path / "b.pt", resume=True,
                              **common)
    for (n, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert p.device.type == DEVICE.type
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
