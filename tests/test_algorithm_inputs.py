"""Bad input to the algorithms gets a clear error; a user's own module just works."""

import pytest
import torch
from torch import nn

from metalearn import ANIL, FOMAML, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile
from metalearn.data import SineTasks, TaskBatch
from metalearn.models import MLP, Conv4
from tests.test_maml import synthetic_image_batch


def test_mismatched_taskbatch_shapes():
    x, y = torch.zeros(4, 5, 1), torch.zeros(4, 5, 1)
    with pytest.raises(ValueError, match="disagree on the number of tasks"):
        TaskBatch(x, y, torch.zeros(3, 5, 1), torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match="support_x has 5 examples per task but support_y has 4"):
        TaskBatch(x, torch.zeros(4, 4, 1), x, y)
    with pytest.raises(ValueError, match="support and query inputs differ"):
        TaskBatch(x, y, torch.zeros(4, 5, 2), y)


def test_labels_out_of_range():
    batch = synthetic_image_batch(ways=5)
    with pytest.raises(ValueError, match=r"labels range over \[0, 4\] but the model has 3 outputs"):
        MAML(Conv4(ways=3), 0.4, 1).step(batch)


@pytest.mark.parametrize("cls", [MAML, FOMAML, Reptile])
def test_bad_hyperparameters(cls):
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 0"):
        cls(MLP(), 0.01, -1)
    with pytest.raises(ValueError, match="inner_lr must be a finite number > 0"):
        cls(MLP(), 0.0, 1)
    with pytest.raises(ValueError, match="inner_lr must be a finite number > 0"):
        cls(MLP(), -0.1, 1)
    with pytest.raises(ValueError, match="unknown flood_mode 'sample'"):
        cls(MLP(), 0.01, 1, inner_flood=0.1, flood_mode="sample")
    with pytest.raises(ValueError, match="inner_flood must be a finite level >= 0"):
        cls(MLP(), 0.01, 1, inner_flood=-1.0)


def test_reptile_specific_options():
    with pytest.raises(ValueError, match="unknown inner_optimizer 'rmsprop'"):
        Reptile(MLP(), 0.01, 1, inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown sampling 'shuffle'"):
        Reptile(MLP(), 0.01, 1, sampling="shuffle")


def test_model_without_trainable_parameters():
    model = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MAML(model, 0.01, 1)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        MAML(lambda x: x, 0.01, 1)


def test_wrong_dtype_or_non_taskbatch():
    maml = MAML(MLP(), 0.01, 1)
    with pytest.raises(ValueError, match="inputs are torch.float64 but the model's parameters"):
        maml.step(SineTasks().sample(2).to("cpu", torch.float64))
    with pytest.raises(TypeError, match="needs a TaskBatch"):
        maml.step((1, 2, 3, 4))


class UserNet(nn.Module):
    """A module of the kind a user brings: BatchNorm on, dropout off, a frozen layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(1, 32)
        self.embed.requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.Dropout(0.0), nn.Linear(32, 1))

    def forward(self, x):
        return self.body(torch.tanh(self.embed(x)))


@pytest.mark.parametrize("cls", [MAML, FOMAML, Reptile, MetaSGD, ANIL, MAMLPlusPlus, IMAML])
def test_user_module_trains_through_the_same_api(cls):
    torch.manual_seed(0)
    net = UserNet()
    frozen = net.embed.weight.clone()
    # iMAML's meta-gradient is (I + H/lam)^-1 g: with lam = 1 the sine loss's large Hessian
    # damps it so much that 150 iterations barely learn. lam = 10 learns, but so close to the
    # threshold that the thread count decides (6.54 -> 4.60 with 2 threads, 5.55 with 1);
    # lam = 100 gives 4.47-4.49 with either.
    extra = {"lam": 100.0} if cls is IMAML else {}
    learner = cls(net, 0.01 if cls is not Reptile else 0.02, 1, **extra)
    # Meta-SGD and MAML++ also meta-learn their inner learning rates.
    params = learner.meta_parameters() if hasattr(learner, "meta_parameters") else \
        net.parameters()
    opt = torch.optim.Adam(params, lr=3e-3) if cls is not Reptile else \
        torch.optim.SGD(params, lr=1.0)
    tasks = SineTasks(seed=0)
    eval_batch = SineTasks(seed=99).sample(50)

    def query_mse():
        fast = learner.adapt(eval_batch.support_x, eval_batch.support_y)
        return (learner.predict(fast, eval_batch.query_x) - eval_batch.query_y).pow(2).mean()

    before = query_mse()
    for _ in range(150):
        opt.zero_grad()
        learner.step(tasks.sample(10))
        opt.step()
    assert query_mse() < 0.8 * before
    assert torch.equal(net.embed.weight, frozen)
    assert net.body[1].num_batches_tracked.item() == 0  # running stats untouched
    assert net.embed.weight.grad is None


def test_adapt_accepts_one_task_or_a_batch():
    torch.manual_seed(0)
    maml = MAML(MLP(), 0.01, 2)
    batch = SineTasks(seed=1).sample(3)
    many = maml.adapt(batch.support_x, batch.support_y)
    one = maml.adapt(batch.support_x[1], batch.support_y[1])
    for name in one:
        torch.testing.assert_close(many[name][1], one[name])
    out_many = maml.predict(many, batch.query_x)
    out_one = maml.predict(one, batch.query_x[1])
    assert out_many.shape == (3, 10, 1)
    torch.testing.assert_close(out_many[1], out_one)
    assert not any(v.requires_grad for v in many.values())


@pytest.mark.parametrize("cls", [MAML, Reptile])
def test_trajectory_equals_separate_adaptations(cls):
    torch.manual_seed(0)
    learner = cls(MLP(), 0.01, 1)
    batch = SineTasks(seed=1).sample(3)
    path = learner.adapt(batch.support_x, batch.support_y, steps=4, trajectory=True)
    assert len(path) == 5
    for k in (0, 2, 4):
        direct = learner.adapt(batch.support_x, batch.support_y, steps=k)
        for name in direct:
            torch.testing.assert_close(path[k][name], direct[name])
    one = learner.adapt(batch.support_x[0], batch.support_y[0], steps=2, trajectory=True)
    torch.testing.assert_close(one[2]["0.weight"], path[2]["0.weight"][0])
