"""The compiled first-order regions (metalearn.kernels.compiled) against the per-task loops.

Compiling takes seconds per graph, so these use small models; float64 makes the
comparison exact to round-off.
"""

import pytest
import torch

from metalearn import FOMAML, Reptile
from metalearn.algorithms.reptile import minibatch_indices
from metalearn.kernels import compiled, kernel_settings
from metalearn.models import MLP, Conv4
from tests.reference import maml_loop, reptile_loop
from tests.test_maml import grads_of, synthetic_image_batch, tiny_sine_batch


def record_compiles(monkeypatch) -> list[str]:
    """Stand in for torch.compile: record each compiled function's name, run it eagerly."""
    names = []

    def recording_compile(fn, **_):
        names.append(fn.__name__)
        return fn

    monkeypatch.setattr(compiled.torch, "compile", recording_compile)
    return names


def small_conv4():
    torch.manual_seed(0)
    return Conv4(ways=5, hidden=4).double()


def test_compiled_fomaml_step_matches_the_per_task_loop():
    model = small_conv4()
    batch = synthetic_image_batch(tasks=3, shots=2).to("cpu", torch.float64)
    learner = FOMAML(model, 0.4, 2)
    with kernel_settings(compile=True):
        metrics = learner.step(batch)
    assert learner._compiled["first_order_step"] is not False  # it did compile
    loss, ref = maml_loop(model, batch, 0.4, 2, first_order=True)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-12)
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-12)


def test_compiled_reptile_step_and_evaluation_adapt_match_the_eager_path():
    torch.manual_seed(0)
    model = MLP().double()
    batch = tiny_sine_batch(tasks=4)
    learner = Reptile(model, 1e-2, 3, inner_batch=3, inner_optimizer="adam",
                      generator=torch.Generator().manual_seed(3))
    with kernel_settings(compile=True):
        learner.step(batch)
        learner.generator = torch.Generator().manual_seed(5)  # the same mini-batches twice
        fast = learner.adapt(batch.support_x, batch.support_y, steps=2, trajectory=True)
    assert learner._compiled["adapt"] is not False
    idx = minibatch_indices(4, 5, 3, 3, "cycle", torch.Generator().manual_seed(3))
    ref = reptile_loop(model, batch, 1e-2, 3, indices=idx, optimizer="adam")
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-12)
    learner.generator = torch.Generator().manual_seed(5)
    eager = learner.adapt(batch.support_x, batch.support_y, steps=2, trajectory=True)
    for got, want in zip(fast, eager, strict=True):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


def test_a_region_that_fails_to_compile_runs_eagerly_after_a_notice(monkeypatch, capsys):
    def broken_compile(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler\nmore detail")
        return call

    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    torch.manual_seed(0)
    model = MLP().double()
    batch = tiny_sine_batch()
    learner = FOMAML(model, 0.01, 1)
    with kernel_settings(compile=True):
        learner.step(batch)
        learner.step(batch)  # the notice once; the region stays eager
    err = capsys.readouterr().err
    assert err.count("torch.compile failed for FOMAML.first_order_step") == 1
    assert "RuntimeError: no C++ compiler" in err and "more detail" not in err
    assert learner._compiled["first_order_step"] is False
    _, ref = maml_loop(model, batch, 0.01, 1, first_order=True)
    for name, g in grads_of(model).items():
        torch.testing.assert_close(g, 2 * ref[name], rtol=1e-9, atol=1e-12)


def test_the_compile_flag_compiles_the_first_order_regions_of_a_cli_run(
        monkeypatch, tmp_path, capsys):
    compiled_regions = record_compiles(monkeypatch)
    from metalearn.cli import main
    from metalearn.kernels import current_settings

    code = main(["train", "--algorithm", "fomaml", "--iterations", "2", "--meta-batch", "4",
                 "--val-every", "2", "--val-tasks", "2", "--no-progress", "--compile",
                 "--checkpoint", str(tmp_path / "run.pt")])
    assert code == 0, capsys.readouterr().err
    assert set(compiled_regions) == {"_first_order_region", "_adapt_region"}
    assert current_settings().compile is False  # the setting lasts for the command only
    code = main(["train", "--algorithm", "fomaml", "--iterations", "1", "--meta-batch", "4",
                 "--no-progress", "--checkpoint", str(tmp_path / "plain.pt")])
    assert code == 0 and len(compiled_regions) == 2  # off without the flag


def test_an_adaptation_longer_than_the_unrolling_limit_runs_eagerly(monkeypatch):
    compiled_regions = record_compiles(monkeypatch)
    torch.manual_seed(0)
    batch = tiny_sine_batch()
    learner = FOMAML(MLP().double(), 0.01, 1)
    with kernel_settings(compile=True):
        learner.adapt(batch.support_x, batch.support_y, steps=compiled.MAX_UNROLLED_STEPS + 1)
        assert compiled_regions == [] and "adapt" not in learner.__dict__.get("_compiled", {})
        learner.adapt(batch.support_x, batch.support_y, steps=compiled.MAX_UNROLLED_STEPS)
    assert compiled_regions == ["_adapt_region"]
