"""Custom models: the traps that used to pass silently (issue #28, item 4), each with the
behaviour that replaces it. Every test here failed on the code before."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn import ANIL, MAML, MAMLPlusPlus, evaluate
from metalearn.checkpoint import save_checkpoint
from metalearn.config import TrainConfig, build_learner, build_model
from metalearn.data import TaskBatch
from metalearn.export import batch_statistics_everywhere, export, export_checkpoint
from metalearn.kernels import norm_layers
from metalearn.models import Conv4
from metalearn.training import CHECKPOINT_FORMAT
from tests.reference import losses_of, maml_loop
from tests.test_anil import anil_loop
from tests.test_maml_plus_plus import learned_tables

WAYS, SIZE = 3, 8


def batch_of(tasks=3, shots=2, queries=2, size=SIZE, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        x = torch.rand(tasks, WAYS * n, 1, size, size, generator=g, dtype=dtype)
        return x, torch.arange(WAYS).repeat_interleave(n).repeat(tasks, 1)

    return TaskBatch(*split(shots), *split(queries))


def all_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def max_relative_difference(got, ref):
    scale = max(r.abs().max().item() for r in ref.values())
    return max((got[n] - ref[n]).abs().max().item() for n in ref) / scale


# -- ANIL's head -------------------------------------------------------------------------
class HeadDeclaredFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, WAYS)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8))

    def forward(self, x):
        return self.head(self.body(x))


class FunctionalHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WAYS, 16) * 0.1)
        self.bias = nn.Parameter(torch.zeros(WAYS))
        self.body = nn.Linear(SIZE * SIZE, 16)

    def forward(self, x):
        h = torch.relu(self.body(x.view(x.size(0), -1)))
        return F.linear(h, self.weight, self.bias)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(SIZE * SIZE, 8), nn.Linear(8, WAYS)

    def forward(self, x):
        h = self.body(x.flatten(1))
        if h.mean() > 0:  # control flow on data: torch.fx cannot trace it
            h = torch.relu(h)
        return self.head(h)


def test_anil_adapts_the_layer_that_produces_the_output_not_the_last_declared():
    # It used to take body.5, the BatchNorm1d declared last, as the head.
    torch.manual_seed(0)
    model = HeadDeclaredFirst().double()
    anil = ANIL(model, 0.3, 2)
    assert anil.inner_names == ("head.weight", "head.bias")
    batch = batch_of()
    metrics = anil.step(batch)
    loss, ref = anil_loop(model, batch, 0.3, 2, ("head.weight", "head.bias"))
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert max_relative_difference(all_grads(model), ref) < 1e-10


def test_anil_finds_a_head_computed_with_the_models_own_parameters():
    # It used to take body, the last module with parameters of its own.
    assert ANIL(FunctionalHead(), 0.1, 1).inner_names == ("weight", "bias")


def test_anil_asks_for_inner_params_where_it_cannot_trace_the_model():
    with pytest.raises(ValueError, match=r"trace failed .*inner_params="):
        ANIL(DataDependent(), 0.1, 1)
    assert ANIL(DataDependent(), 0.1, 1, inner_params="head").inner_names == (
        "head.weight", "head.bias")


# -- normalisation functions called by the model's own code ------------------------------
class NormFunction(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        shape = (4, SIZE, SIZE) if kind == "layer_norm" else (4,)
        self.weight = nn.Parameter(torch.rand(shape) + 0.5)
        self.bias = nn.Parameter(torch.randn(shape) * 0.1)
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))
        self.fc = nn.Linear(4 * SIZE * SIZE, WAYS)

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "batch_norm":
            h = F.batch_norm(h, None, None, self.weight, self.bias, training=True)
        elif self.kind == "batch_norm_with_buffers":
            h = F.batch_norm(h, self.running_mean, self.running_var, self.weight, self.bias,
                             training=self.training)
        elif self.kind == "instance_norm":
            h = F.instance_norm(h, weight=self.weight, bias=self.bias)
        elif self.kind == "layer_norm":
            h = F.layer_norm(h, h.shape[1:], self.weight, self.bias)
        else:
            h = F.group_norm(h, 2, self.weight, self.bias)
        return self.fc(torch.relu(h).flatten(1))


@pytest.mark.parametrize("kind", ["batch_norm", "batch_norm_with_buffers", "instance_norm",
                                  "layer_norm", "group_norm"])
def test_maml_meta_gradient_is_exact_with_norm_functions(kind):
    # Under vmap, the native kernels' second derivatives were wrong (relative errors of
    # 1e-3 to 1e-1 here); group_norm's is right, and stays so.
    torch.manual_seed(0)
    model, batch = NormFunction(kind).double(), batch_of()
    metrics = MAML(model, 0.3, 2).step(batch)
    reference = copy.deepcopy(model)
    reference.running_mean = reference.running_var = None  # the batch's statistics
    loss, ref = maml_loop(reference, batch, 0.3, 2)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert max_relative_difference(all_grads(model), ref) < 1e-10
    assert torch.equal(model.running_mean, torch.zeros(4))  # left alone, as BatchNorm's


def test_norm_functions_use_batch_statistics_in_eval_mode_too():
    torch.manual_seed(0)
    model, batch = NormFunction("batch_norm_with_buffers").double(), batch_of()
    maml = MAML(model, 0.3, 1)
    fast = maml.adapt(batch.support_x[0], batch.support_y[0])
    training = maml.predict(fast, batch.query_x[0])
    model.eval()
    torch.testing.assert_close(maml.predict(fast, batch.query_x[0]), training)


def test_the_interception_is_off_for_models_without_norm_functions():
    model = Conv4(ways=WAYS, hidden=4, image_size=SIZE).double()
    MAML(model, 0.3, 1).step(batch_of())
    assert norm_layers._CALLS_NORM_FUNCTIONS[model] == {True: False}
    other = NormFunction("batch_norm").double()
    MAML(other, 0.3, 1).step(batch_of())
    assert norm_layers._CALLS_NORM_FUNCTIONS[other] == {True: True}


# -- plain PyTorch predicts as evaluate ----------------------------------------------------
def trained(make_learner, iterations=3):
    torch.manual_seed(0)
    model = Conv4(ways=WAYS, hidden=8, image_size=SIZE).double()
    learner = make_learner(model)
    opt = torch.optim.Adam(learner.parameters(), lr=0.05)
    for i in range(iterations):
        opt.zero_grad()
        learner.step(batch_of(seed=10 + i))
        opt.step()
    return learner


def test_exported_model_predicts_as_the_learner_where_eval_mode_did_not():
    learner = trained(lambda m: MAML(m, 0.4, 2))
    batch = batch_of(seed=1)
    fast = learner.adapt(batch.support_x[0], batch.support_y[0])
    expected = learner.predict(fast, batch.query_x[0])
    # The trap: the same weights in plain PyTorch, eval mode, normalise with the running
    # buffers (never filled: mean 0, variance 1).
    plain = copy.deepcopy(learner.model)
    plain.load_state_dict({**plain.state_dict(), **fast})
    assert (plain.eval()(batch.query_x[0]) - expected).abs().max() > 0.1
    # The export: batch statistics in eval mode too.
    net = export(learner, fast)
    assert not net.training
    assert all(m.running_mean is None for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(net(batch.query_x[0]), expected, rtol=1e-10, atol=1e-12)
    assert learner.model.features[1].running_var is not None  # the learner's model untouched


def test_fine_tuning_the_exported_model_in_plain_pytorch_gives_evaluates_accuracies():
    learner = trained(lambda m: MAML(m, 0.4, 2))
    tasks = batch_of(tasks=6, seed=2, queries=3)
    result = evaluate(learner, tasks, max_steps=2, progress=False)
    for i in range(len(tasks)):
        net = export(learner)
        opt = torch.optim.SGD(net.parameters(), lr=learner.inner_lr)
        accuracies = []
        for step in range(3):
            with torch.no_grad():
                out = net(tasks.query_x[i])
            accuracies.append((out.argmax(1) == tasks.query_y[i]).double().mean().item())
            if step < 2:
                opt.zero_grad()
                losses_of(net(tasks.support_x[i]), tasks.support_y[i]).mean().backward()
                opt.step()
        assert accuracies == result.per_task[i].tolist(), i
    assert len(set(result.per_task.flatten().tolist())) > 1  # not a constant comparison


def test_mamlpp_export_uses_the_learned_per_step_batch_norm():
    learner = trained(lambda m: MAMLPlusPlus(m, 0.1, 2, msl_iterations=10))
    learned_tables(learner, seed=1)  # make the rows clearly different from the model's BN
    batch = batch_of(seed=3)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    fast = learner.adapt(sx, sy)
    torch.testing.assert_close(export(learner, fast)(qx), learner.predict(fast, qx),
                               rtol=1e-10, atol=1e-12)
    # Without fast: theta with the final step's BatchNorm row (steps=0: row 0, as adapt).
    theta = {n: p.detach() for n, p in learner.fmodel.params().items()}
    final = learner.predict({**theta, **learner._bn_at(1)}, qx)
    torch.testing.assert_close(export(learner)(qx), final, rtol=1e-10, atol=1e-12)
    at_start = learner.predict(learner.adapt(sx, sy, steps=0), qx)
    torch.testing.assert_close(export(learner, steps=0)(qx), at_start, rtol=1e-10, atol=1e-12)
    # The trap: the model's state dict loads into a plain Conv4 with all keys matched, but
    # holds the unused BatchNorm affine: wrong even with batch statistics.
    plain = Conv4(ways=WAYS, hidden=8, image_size=SIZE).double()
    loaded = plain.load_state_dict(learner.model.state_dict())
    assert not loaded.missing_keys and not loaded.unexpected_keys
    assert (batch_statistics_everywhere(plain).eval()(qx) - final).abs().max() > 0.1


def test_export_checkpoint_restores_mamlpp_learned_state(tmp_path):
    cfg = TrainConfig(dataset="omniglot", algorithm="mamlpp", ways=WAYS).resolved()
    torch.manual_seed(0)
    model = build_model(cfg)
    learner = build_learner(cfg, model, evaluation=True)
    learned_tables(learner, seed=2)
    path = tmp_path / "run.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "iteration": 1,
                           "model": model.state_dict(),
                           "learner": learner.learned.state_dict()})
    x = torch.rand(6, 1, 28, 28)
    net = export_checkpoint(path)
    torch.testing.assert_close(net(x), export(learner)(x))
    bn = learner.bn_names[0]
    assert not torch.equal(net.get_parameter(bn), model.get_parameter(bn))


def test_export_rejects_weights_that_do_not_fit():
    learner = MAML(Conv4(ways=WAYS, hidden=4, image_size=SIZE).double(), 0.4, 1)
    batch = batch_of()
    many = learner.adapt(batch.support_x, batch.support_y)
    with pytest.raises(ValueError, match=r"weights of 3 tasks; export one task's"):
        export(learner, many)
    with pytest.raises(ValueError, match="missing"):
        export(learner, {"classifier.weight": many["classifier.weight"][0]})
    with pytest.raises(ValueError, match="steps applies only without fast"):
        export(learner, {k: v[0] for k, v in many.items()}, steps=1)
    with pytest.raises(TypeError, match="metalearn learner"):
        export(learner.model)


# -- errors that name the cause and the fix ------------------------------------------------
class ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(SIZE * SIZE, WAYS)

    def forward(self, x):
        h = x.flatten(1)
        return self.fc(h), h


def test_a_model_that_returns_a_tuple_is_a_clear_error():
    # It used to fail inside the learner: 'tuple' object has no attribute 'shape'.
    with pytest.raises(TypeError, match=r"returned a tuple.*one tensor.*self.net\(x\)\[0\]"):
        MAML(ReturnsTuple().double(), 0.1, 1).step(batch_of())


def test_one_query_into_batch_norm_is_a_clear_error():
    # It used to fail inside torch ("Expected more than 1 value per channel").
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 8), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, WAYS)).double()
    maml, batch = MAML(model, 0.1, 1), batch_of()
    fast = maml.adapt(batch.support_x[0], batch.support_y[0])
    with pytest.raises(ValueError, match=r"one example per task.*BatchNorm layer '2'.*"
                                         r"together.*torch.cat\(\[support_x, query\]\)"):
        maml.predict(fast, batch.query_x[0, :1])
    many = maml.adapt(batch.support_x, batch.support_y)
    with pytest.raises(ValueError, match="one example per task"):
        maml.predict(many, batch.query_x[:, :1])
    with pytest.raises(ValueError, match="the query set got one example per task"):
        maml.step(TaskBatch(batch.support_x, batch.support_y, batch.query_x[:, :1],
                            batch.query_y[:, :1]))
    # The fix the message gives works:
    alone = maml.predict(fast, torch.cat([batch.support_x[0], batch.query_x[0, :1]]))[-1:]
    assert alone.shape == (1, WAYS)
