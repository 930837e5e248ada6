"""metalearn.train, evaluate and search with a model, samplers, a loss and a metric of the
user's (issue #28 items 1 and 2): everything the harness does for built-ins, for them.

The user objects here: a multi-label task sampler (float multi-hot targets, a
classification-like problem that TaskBatch sees as regression), an MLP, a per-example BCE
and a label-accuracy metric.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metalearn
from metalearn.checkpoint import CheckpointError, load_checkpoint
from metalearn.cli import main
from metalearn.data import TaskBatch
from metalearn.evaluation import Metric
from metalearn.search import search
from metalearn.training import NonFiniteError, train

ROOT = Path(__file__).resolve().parent.parent
LABELS = 4


class MultiLabelTasks:
    """Tasks of ``labels`` binary labels: label c of a point x is on where w_c . x > b_c, with
    w and b drawn per task, so the support set must show which labels are which."""

    def __init__(self, shots=5, queries=10, labels=LABELS, seed=0, dtype=torch.float32,
                 kill_at=None):
        self.shots, self.queries, self.labels, self.seed = shots, queries, labels, seed
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.kill_at, self.calls = kill_at, 0  # a stand-in for a kill, at the n-th draw

    def __repr__(self):
        return (f"MultiLabelTasks(shots={self.shots}, queries={self.queries}, "
                f"labels={self.labels}, seed={self.seed})")

    def sample(self, n):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("killed")
        g, k = self.generator, self.shots
        w = torch.randn(n, 1, self.labels, 2, generator=g)
        b = 0.5 * torch.randn(n, 1, self.labels, generator=g)
        x = torch.randn(n, self.shots + self.queries, 2, generator=g)
        y = ((x.unsqueeze(2) * w).sum(-1) > b).to(self.dtype)
        x = x.to(self.dtype)
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def bce(out, y):
    return F.binary_cross_entropy_with_logits(out, y, reduction="none").mean(-1)


def label_accuracy(out, y):
    return ((out > 0).to(y.dtype) == y).to(torch.float64).mean()


LABEL_ACCURACY = Metric("label accuracy", label_accuracy, higher_is_better=True)
FAST = dict(iterations=30, val_every=10, val_tasks=20, meta_batch=8, inner_lr=0.5,
            outer_lr=3e-3, progress=False)


def net(outputs=LABELS, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, outputs))


def objects(**sampler):
    return dict(model=net(), train_sampler=MultiLabelTasks(seed=0, **sampler),
                val_sampler=MultiLabelTasks(seed=1), loss=bce, metric=LABEL_ACCURACY)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def val_records(result):
    return [r for r in result.history if r["split"] == "val"]


def test_train_kill_resume_and_evaluate_a_user_model_loss_and_data(tmp_path):
    full = train(checkpoint=tmp_path / "full.pt", **objects(), **FAST)
    vals = val_records(full)
    assert [r["iteration"] for r in vals] == [10, 20, 30]
    assert all("label accuracy" in r and r["ci95"] > 0 for r in vals)
    assert full.best["metric"] == "label accuracy"
    assert full.best["value"] == max(r["label accuracy"] for r in vals)  # higher is better
    assert load_checkpoint(tmp_path / "full.best.pt")["best"] == full.best

    # Killed at iteration 25: the checkpoint of iteration 20 is what is left.
    with pytest.raises(KeyboardInterrupt):
        train(checkpoint=tmp_path / "run.pt", **objects(kill_at=25), **FAST)
    state = load_checkpoint(tmp_path / "run.pt")
    assert state["iteration"] == 20 and state["format"] == 3
    assert state["user"]["loss"] == "tests.test_user_objects.bce"
    assert state["user"]["train_sampler"].endswith(
        "MultiLabelTasks(shots=5, queries=10, labels=4, seed=0)")
    # A new process would build everything afresh: new objects, the same settings.
    resumed = train(checkpoint=tmp_path / "run.pt", resume=True, **objects(), **FAST)
    assert resumed.iteration == 30
    a, b = params_of(full.model), params_of(resumed.model)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0)
    assert resumed.best == full.best
    log = [json.loads(x) for x in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log if r["split"] == "val"] == [10, 20, 30]

    # Evaluate on tasks the run never saw, with the user's metric and with the default
    # for float targets and a user loss (the loss itself).
    test = MultiLabelTasks(seed=2).sample(40)
    scored = metalearn.evaluate(resumed.learner, test, max_steps=3, progress=False,
                                metric=LABEL_ACCURACY)
    assert scored.metric == "label accuracy" and scored.steps == [0, 1, 2, 3]
    assert scored.mean[-1] > scored.mean[0]  # adaptation helps: the labels are per task
    # One chunk of 40: the same draw as sample(40) (chunks of batch_size are drawn apart).
    from_sampler = metalearn.evaluate(resumed.learner, MultiLabelTasks(seed=2), num_tasks=40,
                                      batch_size=40, max_steps=3, progress=False,
                                      metric=LABEL_ACCURACY)
    torch.testing.assert_close(from_sampler.per_task, scored.per_task, rtol=0, atol=0)
    default = metalearn.evaluate(resumed.learner, test, max_steps=0, progress=False)
    assert default.metric == "loss"
    with torch.no_grad():
        out = resumed.model(test.query_x)
    want = torch.stack([bce(out[i], test.query_y[i]).mean() for i in range(len(test))])
    torch.testing.assert_close(default.per_task[:, 0], want.double(), rtol=1e-6, atol=1e-7)


def test_resume_with_other_objects_is_refused_naming_what_differs(tmp_path):
    path = tmp_path / "a.pt"
    train(checkpoint=path, **objects(), **{**FAST, "iterations": 10})

    def resume(**changes):
        with pytest.raises(CheckpointError) as info:
            train(checkpoint=path, resume=True, **{**objects(), **changes}, **FAST)
        return str(info.value)

    message = resume(model=nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, LABELS)))
    assert "model: the checkpoint's model has parameter 0.weight (32, 2)" in message
    assert "where this one has parameter 0.weight (16, 2)" in message
    assert "train_sampler: checkpoint" in resume(train_sampler=MultiLabelTasks(shots=6))
    message = resume(val_sampler=MultiLabelTasks(seed=7))
    assert "val_sampler: it drew other validation tasks" in message
    assert "seed=7" in message
    message = resume(loss=lambda o, y: bce(o, y) * 2)
    assert "loss: checkpoint 'tests.test_user_objects.bce' vs now" in message
    assert "<lambda>" in message
    message = resume(metric=Metric("label accuracy", label_accuracy, higher_is_better=False))
    assert "metric:" in message and "lower is better" in message
    message = resume(metric=None)
    assert "metric: the checkpoint's run was given" in message
    # A built-in run's checkpoint and a user run's do not resume each other.
    train(checkpoint=tmp_path / "sine.pt", dataset="sine", **{**FAST, "iterations": 10})
    with pytest.raises(CheckpointError, match="used built-in objects only; this one is given "
                                              "model="):
        train(checkpoint=tmp_path / "sine.pt", resume=True, model=nn.Linear(1, 1), **FAST)
    with pytest.raises(CheckpointError, match="was given model=, train_sampler=, "
                                              "val_sampler=, loss=, metric=; pass the same"):
        train(checkpoint=path, resume=True, **FAST)
    # Nothing was overwritten by the refused attempts.
    assert load_checkpoint(path)["iteration"] == 10


def test_built_in_runs_still_write_format_2_without_user_entries(tmp_path):
    train(checkpoint=tmp_path / "a.pt", dataset="sine", **{**FAST, "iterations": 10})
    for name in ("a.pt", "a.best.pt"):
        raw = torch.load(tmp_path / name, weights_only=True)
        assert raw["format"] == 2 and "user" not in raw


def test_a_user_model_on_built_in_data_and_a_user_loss_on_built_in_data(tmp_path):
    sine = train(model=nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)),
                 dataset="sine", **FAST)
    assert sine.best["metric"] == "mse"
    huber = train(dataset="sine", loss=lambda o, y: F.huber_loss(o, y, reduction="none")
                  .mean(-1), **FAST)
    assert huber.best["metric"] == "loss"  # float targets scored by the user's loss


def test_argument_errors_name_the_argument_and_the_fix():
    class NoState:
        def sample(self, n):
            return MultiLabelTasks().sample(n)

    class Wrong(MultiLabelTasks):
        def __init__(self, returns, **kw):
            super().__init__(**kw)
            self.returns = returns

        def sample(self, n):
            return self.returns(super().sample(n), n)

    base = objects()
    with pytest.raises(TypeError, match=r"train_sampler must be a task sampler with "
                                        r"sample\(n\).*NoState has no state_dict\(\), "
                                        r"load_state_dict\(\)"):
        train(**{**base, "train_sampler": NoState()}, **FAST)
    with pytest.raises(TypeError, match=r"val_sampler must be a task sampler with sample\(n\) "
                                        r"-> TaskBatch; list has no sample\(\)"):
        train(**{**base, "val_sampler": []}, **FAST)
    with pytest.raises(ValueError, match="train_sampler= needs val_sampler= too"):
        train(**{**base, "val_sampler": None}, **FAST)
    with pytest.raises(TypeError, match=r"val_sampler.sample\(20\) returned tuple; it must "
                                        r"return a metalearn.data.TaskBatch"):
        train(**{**base, "val_sampler": Wrong(lambda b, n: (b,))}, **FAST)
    with pytest.raises(ValueError, match=r"train_sampler.sample\(8\) returned 7 tasks"):
        train(**{**base, "train_sampler": Wrong(lambda b, n: b[1:])}, **FAST)

    class Unsaveable(MultiLabelTasks):
        def state_dict(self):
            return {"generator": self.generator}

    with pytest.raises(TypeError, match=r"train_sampler.state_dict\(\)\['generator'\] holds "
                                        "a Generator, which a checkpoint cannot hold"):
        train(**{**base, "train_sampler": Unsaveable()}, **FAST)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        train(**{**base, "model": net}, **FAST)
    with pytest.raises(TypeError, match=r"metric must be a metalearn.evaluation.Metric, got "
                                        r"function; wrap a function as Metric\(name, fn"):
        train(**{**base, "metric": label_accuracy}, **FAST)
    with pytest.raises(TypeError, match="loss must be a per-example loss"):
        train(**{**base, "loss": "bce"}, **FAST)
    with pytest.raises(ValueError, match="dropout=0.1 configures the built-in model, but "
                                         "model= is your own"):
        train(**base, dropout=0.1, **FAST)
    with pytest.raises(ValueError, match="label_smoothing applies to the built-in"):
        train(**base, label_smoothing=0.1, **FAST)
    # Outputs that do not fit the targets, before any step.
    with pytest.raises(ValueError, match=r"the model's outputs, shape \(5, 3\), and one task's "
                                         r"support targets, shape \(5, 4\).*differ in shape.*"
                                         r"give the model \(4,\) outputs"):
        train(**{**base, "model": net(3), "loss": None, "metric": None}, **FAST)
    with pytest.raises(ValueError, match=r"the loss fails on the model's outputs, shape "
                                         r"\(5, 3\)"):
        train(**{**base, "model": net(3)}, **FAST)
    with pytest.raises(ValueError, match=r"returned shape \(5, 4\) for 5 examples; it must "
                                         r"return one loss per example"):
        train(**{**base, "loss": lambda o, y: F.binary_cross_entropy_with_logits(
            o, y, reduction="none")}, **FAST)
    with pytest.raises(ValueError, match=r"the model fails on one task's support inputs, "
                                         r"shape \(5, 2\)"):
        train(**{**base, "model": nn.Linear(3, LABELS)}, **FAST)
    with pytest.raises(ValueError, match="the metric 'bad' returned shape"):
        train(**{**base, "metric": Metric("bad", lambda o, y: o)}, **FAST)


def test_integer_labels_beyond_the_model_outputs_are_named():
    class Blobs(MultiLabelTasks):
        def sample(self, n):
            b = super().sample(n)
            return TaskBatch(b.support_x, b.support_y.argmax(-1), b.query_x,
                             b.query_y.argmax(-1))

    # Named before the first step where the first validation task shows it, else by the
    # learner's own input check at the first step.
    with pytest.raises(ValueError, match=r"labels range over \[0, \d\] but the model has 2 "
                                         r"outputs"):
        train(model=net(2), train_sampler=Blobs(), val_sampler=Blobs(seed=1), **FAST)
    result = train(model=net(), train_sampler=Blobs(), val_sampler=Blobs(seed=1), **FAST)
    assert result.best["metric"] == "accuracy"


def test_non_finite_stop_and_early_stopping_with_user_objects(tmp_path):
    with pytest.raises(NonFiniteError, match="at iteration 1"):
        train(**objects(), **{**FAST, "inner_lr": 1e30, "inner_steps": 3})
    stopped = train(**objects(), **{**FAST, "iterations": 200, "outer_lr": 1e-12,
                                    "patience": 2})
    assert stopped.stopped_early and stopped.iteration == 30


def test_float64_user_model_takes_float32_tasks():
    result = train(**{**objects(), "model": net().double()}, **{**FAST, "iterations": 10})
    assert result.model[0].weight.dtype == torch.float64 and result.best is not None


def test_search_starts_every_trial_from_the_same_objects(tmp_path):
    obj = objects()
    initial = {n: p.detach().clone() for n, p in obj["model"].named_parameters()}
    base = metalearn.config.TrainConfig(iterations=20, val_every=10, val_tasks=20,
                                        meta_batch=8, outer_lr=3e-3)
    result = search(base, {"inner_lr": [0.3, 0.5]}, progress=False, out=tmp_path / "s.json",
                    **obj)
    assert result.metric == "label accuracy" and result.higher_is_better
    # The second trial equals a run of its own: same model start, same tasks.
    alone = train(base, inner_lr=0.5, **objects(), progress=False)
    assert result.trials[1]["best"] == alone.best
    for n, p in obj["model"].named_parameters():  # the given model is not trained
        torch.testing.assert_close(p, initial[n], rtol=0, atol=0)
    fresh = MultiLabelTasks(seed=0)
    torch.testing.assert_close(obj["train_sampler"].sample(3).support_x,
                               fresh.sample(3).support_x, rtol=0, atol=0)
    # Resuming the search reuses the trials of the same objects only.
    again = search(base, {"inner_lr": [0.3, 0.5]}, progress=False, out=tmp_path / "s.json",
                   resume=True, **objects())
    assert [t["seconds"] for t in again.trials] == [t["seconds"] for t in result.trials]
    other = search(base, {"inner_lr": [0.3]}, progress=False, out=tmp_path / "s.json",
                   resume=True, **{**objects(), "loss": lambda o, y: bce(o, y)})
    assert other.trials[0]["seconds"] != result.trials[0]["seconds"]
    with pytest.raises(ValueError, match="queries does nothing with train_sampler="):
        search(base, {"queries": [5, 10]}, progress=False, **objects())
    default = search(base, {"inner_lr": [0.3]}, progress=False,
                     **{**objects(), "metric": None})
    assert (default.metric, default.higher_is_better) == ("loss", False)


def test_cli_eval_of_a_user_run_says_to_evaluate_in_python(tmp_path, capsys):
    train(checkpoint=tmp_path / "a.pt", **objects(), **{**FAST, "iterations": 10})
    code = main(["eval", "--checkpoint", str(tmp_path / "a.best.pt"), "--tasks", "5",
                 "--no-progress", "--no-malloc-reuse"])
    assert code == 1 and "metalearn.evaluate" in capsys.readouterr().err


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
import metalearn
from tests.test_user_objects import FAST, objects
torch.set_num_threads(1)
metalearn.train(checkpoint=sys.argv[1], **objects(), **{{**FAST, "iterations": 6,
                "val_every": 3, "val_tasks": 7, "meta_batch": 5}})
"""


def test_two_gloo_ranks_equal_one_process_with_user_objects(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)}
    import os

    env = {**os.environ, **env}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), str(tmp_path / "two.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=0, atol=1e-5)
    assert b["best"]["value"] == pytest.approx(a["best"]["value"], rel=1e-6)
    assert a["user"] == b["user"]
