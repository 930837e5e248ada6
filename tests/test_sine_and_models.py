"""The sine sampler (Finn et al. 2017 setup), TaskBatch helpers and built-in models."""

import math

import pytest
import torch

from metalearn.data import SineTasks, TaskBatch
from metalearn.models import MLP, Conv4


def test_sine_shapes_ranges_and_formula():
    sampler = SineTasks(shots=5, queries=7, seed=3)
    b = sampler.sample(2000)
    assert b.support_x.shape == (2000, 5, 1) and b.query_y.shape == (2000, 7, 1)
    amp, phase = sampler.last_amplitude, sampler.last_phase
    assert amp.min() >= 0.1 and amp.max() <= 5.0
    assert phase.min() >= 0 and phase.max() <= math.pi
    x = torch.cat([b.support_x, b.query_x], 1)
    assert x.min() >= -5 and x.max() <= 5
    assert abs(x.mean().item()) < 0.1 and abs(amp.mean().item() - 2.55) < 0.1
    y = torch.cat([b.support_y, b.query_y], 1)
    torch.testing.assert_close(y, amp.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1)))
    assert not b.is_classification


def test_sine_is_seeded_and_resumable():
    a, b = SineTasks(seed=1), SineTasks(seed=1)
    assert torch.equal(a.sample(4).query_y, b.sample(4).query_y)
    assert not torch.equal(SineTasks(seed=2).sample(4).query_y, SineTasks(seed=1).sample(4).query_y)
    state = a.state_dict()
    first = a.sample(3)
    a.load_state_dict(state)
    assert torch.equal(a.sample(3).support_x, first.support_x)


@pytest.mark.parametrize("kwargs", [{"shots": 0}, {"queries": -1}, {"shots": 2.5}])
def test_sine_bad_counts(kwargs):
    with pytest.raises((ValueError, TypeError), match="shots|queries"):
        SineTasks(**kwargs)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SineTasks().sample(0)


def test_taskbatch_slicing_cat_and_to():
    b = SineTasks(seed=0).sample(6)
    parts = [b[0:2], b[2:5], b[5]]
    assert [len(p) for p in parts] == [2, 3, 1]
    joined = TaskBatch.cat(parts)
    assert torch.equal(joined.query_x, b.query_x)
    assert b.to("cpu", torch.float64).support_x.dtype == torch.float64


def test_models_shapes_and_inits():
    assert MLP()(torch.zeros(3, 1)).shape == (3, 1)
    assert sum(p.numel() for p in MLP().parameters()) == 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1
    net = Conv4(ways=20)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 20)
    assert net.classifier.in_features == 64 * 2 * 2  # 28 -> 14 -> 7 -> 4 -> 2
    he, xavier = Conv4(5, init="he"), Conv4(5, init="xavier")
    fan_in = 64 * 9
    assert abs(he.features[3].weight.std().item() - math.sqrt(2 / fan_in)) < 0.01
    bound = math.sqrt(6 / (fan_in + 64 * 9))
    assert xavier.features[3].weight.abs().max().item() <= bound
    with pytest.raises(ValueError, match="unknown init scheme"):
        MLP(init="orthogonal")
