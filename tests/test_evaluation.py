"""evaluate: the CI formula by hand, per-task values against plain per-task loops, the
transductive and non-transductive BatchNorm settings, chunking and the model's mode."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn import MAML
from metalearn.data import SineTasks, TaskBatch
from metalearn.evaluation import EvaluationResult, evaluate
from metalearn.models import MLP, Conv4
from tests.reference import batch_stats_copy, losses_of
from tests.test_memory import image_batch


def constant_classifier():
    """Always predicts class 0, whatever the input."""
    net = nn.Linear(1, 2)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([1.0, 0.0]))
    return net


def test_ci_is_the_maml_formula_on_known_accuracies():
    labels = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    tasks = TaskBatch(torch.zeros(4, 1, 1), torch.zeros(4, 1, dtype=torch.long),
                      torch.zeros(4, 4, 1), labels)
    result = evaluate(MAML(constant_classifier(), 0.1, 1), tasks, max_steps=0, progress=False)
    # Accuracies 1, 1/2, 1/4, 0: mean 7/16, population variance 35/256 (ddof=0).
    assert result.metric == "accuracy" and result.steps == [0] and result.num_tasks == 4
    assert result.per_task[:, 0].tolist() == [1.0, 0.5, 0.25, 0.0]
    assert result.mean == [7 / 16]
    assert result.ci95[0] == pytest.approx(1.96 * math.sqrt(35 / 256) / 2, rel=1e-12)
    assert result.ci95[0] != pytest.approx(1.96 * math.sqrt(35 / 192) / 2, rel=1e-3)  # ddof=1


def test_ci_is_the_maml_formula_on_known_mses():
    net = nn.Linear(1, 1)
    nn.init.zeros_(net.weight)
    nn.init.zeros_(net.bias)
    targets = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 5, 1)
    tasks = TaskBatch(torch.zeros(3, 2, 1), torch.zeros(3, 2, 1), torch.zeros(3, 5, 1), targets)
    result = evaluate(MAML(net, 0.1, 1), tasks, max_steps=0, progress=False)
    # MSEs 1, 4, 9: mean 14/3, population variance 98/9.
    assert result.metric == "mse"
    assert result.mean[0] == pytest.approx(14 / 3, rel=1e-12)
    assert result.ci95[0] == pytest.approx(1.96 * math.sqrt(98 / 9) / math.sqrt(3), rel=1e-12)


def plain_loop_metric(maml, tasks, steps, per_query=False):
    """(tasks, steps + 1) metric, one separate adapt() per task and step count."""
    net = batch_stats_copy(maml.model)
    rows = []
    for i in range(len(tasks)):
        sx, sy, qx, qy = (t[i] for t in (tasks.support_x, tasks.support_y,
                                         tasks.query_x, tasks.query_y))
        row = []
        for k in range(steps + 1):
            fast = maml.adapt(sx, sy, steps=k)
            with torch.no_grad():
                if per_query:
                    out = torch.stack([functional_call(net, fast, (torch.cat([sx, q[None]]),))[-1]
                                       for q in qx])
                else:
                    out = functional_call(net, fast, (qx,))
            if qy.dtype.is_floating_point:
                row.append(losses_of(out, qy).mean().item())
            else:
                row.append((out.argmax(-1) == qy).double().mean().item())
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("setup", ["conv4", "sine"])
def test_per_task_values_mean_and_ci_match_a_plain_loop(setup):
    torch.manual_seed(0)
    if setup == "conv4":
        maml, tasks = MAML(Conv4(ways=5, hidden=8), 0.4, 1), image_batch(tasks=6, seed=1)
    else:
        maml, tasks = MAML(MLP(), 0.01, 1), SineTasks(seed=1).sample(6)
    result = evaluate(maml, tasks, max_steps=3, progress=False)
    expected = plain_loop_metric(maml, tasks, 3)
    np.testing.assert_allclose(result.per_task.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.mean, expected.mean(0), rtol=1e-5)
    np.testing.assert_allclose(result.ci95, 1.96 * expected.std(0) / np.sqrt(6), rtol=1e-4)
    assert result.steps == [0, 1, 2, 3]
    assert len(set(result.mean)) > 1  # adaptation changes the metric


def test_step_zero_is_the_unadapted_model():
    torch.manual_seed(0)
    model = Conv4(ways=5, hidden=8)
    tasks = image_batch(tasks=5, seed=2)
    result = evaluate(MAML(model, 0.4, 1), tasks, max_steps=2, progress=False)
    with torch.no_grad():
        out = torch.stack([batch_stats_copy(model)(qx) for qx in tasks.query_x])
    expected = (out.argmax(-1) == tasks.query_y).double().mean(1)
    torch.testing.assert_close(result.per_task[:, 0], expected)


def bn_regressor():
    return nn.Sequential(nn.Linear(1, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 1))


@pytest.mark.parametrize("setup", ["bn_sine", "conv4"])
def test_non_transductive_predicts_each_query_with_the_support_set_only(setup):
    torch.manual_seed(0)
    if setup == "bn_sine":
        maml, tasks = MAML(bn_regressor(), 0.01, 1), SineTasks(shots=5, queries=6, seed=3).sample(4)
    else:
        maml, tasks = MAML(Conv4(ways=5, hidden=8), 0.4, 1), image_batch(tasks=4, queries=3)
    trans = evaluate(maml, tasks, max_steps=2, transductive=True, progress=False)
    alone = evaluate(maml, tasks, max_steps=2, transductive=False, batch_size=3, progress=False)
    expected = plain_loop_metric(maml, tasks, 2, per_query=True)
    np.testing.assert_allclose(alone.per_task.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(trans.per_task, alone.per_task)


def test_without_batchnorm_both_settings_agree():
    torch.manual_seed(0)
    maml, tasks = MAML(MLP(), 0.01, 1), SineTasks(seed=4).sample(10)
    trans = evaluate(maml, tasks, max_steps=3, transductive=True, progress=False)
    alone = evaluate(maml, tasks, max_steps=3, transductive=False, progress=False)
    torch.testing.assert_close(trans.per_task, alone.per_task, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transductive", [True, False])
def test_chunking_does_not_change_the_result(transductive):
    torch.manual_seed(0)
    maml, tasks = MAML(bn_regressor(), 0.01, 1), SineTasks(seed=5).sample(11)
    whole = evaluate(maml, tasks, max_steps=2, transductive=transductive, batch_size=100,
                     progress=False)
    chunks = evaluate(maml, tasks, max_steps=2, transductive=transductive, batch_size=3,
                      progress=False)
    torch.testing.assert_close(whole.per_task, chunks.per_task, rtol=1e-5, atol=1e-6)
    assert chunks.num_tasks == 11


def test_runs_in_eval_mode_and_restores_every_module_mode():
    torch.manual_seed(0)
    model = MLP(dropout=0.5)
    model[0].eval()  # a mixed state that model.train(True) would not restore
    maml, tasks = MAML(model, 0.01, 1), SineTasks(seed=6).sample(5)
    a = evaluate(maml, tasks, max_steps=2, progress=False)
    b = evaluate(maml, tasks, max_steps=2, progress=False)
    torch.testing.assert_close(a.per_task, b.per_task, rtol=0, atol=0)  # no dropout noise
    assert model.training and not model[0].training and model[2].training


def test_result_to_dict_is_json_and_str_is_a_table():
    torch.manual_seed(0)
    result = evaluate(MAML(MLP(), 0.01, 1), SineTasks(seed=7).sample(4), max_steps=2,
                      progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["metric"] == "mse" and data["steps"] == [0, 1, 2] and data["num_tasks"] == 4
    assert np.array(data["per_task"]).shape == (4, 3)
    assert "per_task" not in result.to_dict(include_per_task=False)
    text = str(result)
    assert "mse over 4 tasks" in text and len(text.splitlines()) == 2 + 3
    acc = EvaluationResult.from_per_task("accuracy", torch.tensor([[0.5], [1.0]]))
    assert "75.00 ±" in str(acc)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_steps": -1}, ValueError, "max_steps"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"tasks": SineTasks(seed=0).sample(3)[0:0]}, ValueError, "empty"),
    ({"tasks": "not tasks"}, TypeError, "TaskBatch"),
])
def test_bad_arguments(kwargs, error, match):
    args = {"tasks": SineTasks(seed=0).sample(3), "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        evaluate(MAML(MLP(), 0.01, 1), **args)


class _CountingSampler:
    """Sine tasks, recording every draw's size."""

    def __init__(self, seed):
        self.inner, self.draws = SineTasks(seed=seed), []

    def sample(self, n):
        self.draws.append(n)
        return self.inner.sample(n)


def test_a_sampler_is_drawn_one_chunk_at_a_time():
    torch.manual_seed(0)
    maml = MAML(MLP(), inner_lr=0.01, inner_steps=1)
    sampler = _CountingSampler(seed=3)
    got = evaluate(maml, sampler, num_tasks=23, batch_size=10, max_steps=2, progress=False)
    assert sampler.draws == [10, 10, 3]  # never more than one chunk in memory
    replay = SineTasks(seed=3)
    same = TaskBatch.cat([replay.sample(n) for n in (10, 10, 3)])
    want = evaluate(maml, same, batch_size=10, max_steps=2, progress=False)
    torch.testing.assert_close(got.per_task, want.per_task)


def test_evaluation_tasks_keep_small_task_sets_whole():
    from metalearn.config import TrainConfig, evaluation_tasks

    cfg = TrainConfig(dataset="sine").resolved()
    drawn = evaluation_tasks(cfg, "test", seed=5, count=7)
    assert set(drawn) == {"tasks"}
    torch.testing.assert_close(drawn["tasks"].query_y, SineTasks(
        shots=cfg.eval_shots, queries=cfg.eval_queries, seed=5).sample(7).query_y)
