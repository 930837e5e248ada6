"""The training loop: validation, best checkpoint, early stopping, resume, atomic saves."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

import metalearn
from metalearn.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from metalearn.config import TrainConfig, build_schedule
from metalearn.training import NonFiniteError, train

FAST = dict(dataset="sine", iterations=30, val_every=10, val_tasks=20, meta_batch=5)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_train_learns_sine_and_writes_checkpoint_best_and_log(tmp_path):
    ckpt = tmp_path / "new" / "folder" / "run.pt"  # folders are created
    result = train(progress=False, checkpoint=ckpt, **{**FAST, "iterations": 300,
                                                        "val_every": 100})
    vals = [r for r in result.history if r["split"] == "val"]
    assert [r["iteration"] for r in vals] == [100, 200, 300]
    assert vals[-1]["mse"] < vals[0]["mse"]
    assert ckpt.exists() and ckpt.with_suffix(".best.pt").exists()
    lines = [json.loads(x) for x in ckpt.with_suffix(".jsonl").read_text().splitlines()]
    assert {r["split"] for r in lines} == {"train", "val"}
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 300 and state["config"]["inner_lr"] == 0.01
    best = load_checkpoint(ckpt.with_suffix(".best.pt"))
    assert best["best"]["value"] == min(r["mse"] for r in vals)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = train(progress=False, checkpoint=tmp_path / "a.pt", **FAST)
    train(progress=False, checkpoint=tmp_path / "b.pt", **{**FAST, "iterations": 20})
    resumed = train(progress=False, checkpoint=tmp_path / "b.pt", resume=True, **FAST)
    assert resumed.iteration == 30
    a, b = params_of(full.model), params_of(resumed.model)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


class SecondPerIteration:
    """A clock for ``metalearn.training`` that advances one second per meta-iteration."""

    def __init__(self, monkeypatch):
        from metalearn import training

        self.now = 0.0
        step = training._Run.meta_step

        def timed_step(run, on_disk):
            self.now += 1.0
            return step(run, on_disk)

        monkeypatch.setattr(training._Run, "meta_step", timed_step)
        # training's own name for the time module, not the module everyone shares
        monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: self.now))


def test_time_limit_stops_at_the_next_validation_and_resume_finishes_the_run(
        tmp_path, monkeypatch):
    full = train(progress=False, checkpoint=tmp_path / "a.pt", **FAST)
    SecondPerIteration(monkeypatch)
    cut = train(progress=False, checkpoint=tmp_path / "b.pt", time_limit=15, **FAST)
    # 15 s pass during iteration 15; the next validation is at 20.
    assert cut.out_of_time and cut.iteration == 20
    assert load_checkpoint(tmp_path / "b.pt")["iteration"] == 20
    resumed = train(progress=False, checkpoint=tmp_path / "b.pt", resume=True, **FAST)
    assert resumed.iteration == 30 and not resumed.out_of_time
    a, b = params_of(full.model), params_of(resumed.model)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_a_time_limit_reached_at_the_last_iteration_is_not_out_of_time(monkeypatch):
    SecondPerIteration(monkeypatch)
    assert not train(progress=False, time_limit=30, **FAST).out_of_time


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1h", True])
def test_bad_time_limits_are_named(bad):
    with pytest.raises(ValueError, match="time_limit must be a number of seconds > 0"):
        train(progress=False, time_limit=bad, **FAST)


@pytest.mark.parametrize("inner", [{}, {"inner_optimizer": "adam", "inner_lr": 1e-3}])
def test_resume_with_reptile_and_its_minibatch_rng(tmp_path, inner):
    # Constant schedule: a shorter first run would otherwise anneal the meta step faster.
    # With Adam, its carried moments are part of the checkpoint.
    cfg = dict(FAST, algorithm="reptile", inner_batch=5, schedule="constant", **inner)
    full = train(progress=False, checkpoint=tmp_path / "a.pt", **cfg)
    train(progress=False, checkpoint=tmp_path / "b.pt", **{**cfg, "iterations": 10})
    resumed = train(progress=False, checkpoint=tmp_path / "b.pt", resume=True, **cfg)
    for n, p in params_of(full.model).items():
        torch.testing.assert_close(p, params_of(resumed.model)[n], rtol=0, atol=0)
    if inner:
        state = resumed.learner.learned.state_dict()
        cfg_ = full.config
        assert state["adam_t"].item() == cfg_.iterations * cfg_.meta_batch * cfg_.inner_steps
        for k, v in full.learner.learned.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_a_reptile_adam_checkpoint_from_before_the_carried_state_resumes_as_task(tmp_path):
    # Saved configs without inner_adam_state restarted Adam for every task.
    cfg = dict(FAST, algorithm="reptile", inner_optimizer="adam", inner_lr=1e-3,
               iterations=10, inner_adam_state="task")
    train(progress=False, checkpoint=tmp_path / "a.pt", **cfg)
    state = load_checkpoint(tmp_path / "a.pt")
    del state["config"]["inner_adam_state"]
    save_checkpoint(tmp_path / "a.pt", state)
    done = train(progress=False, checkpoint=tmp_path / "a.pt", resume=True,
                 **{**cfg, "iterations": 12})
    assert done.iteration == 12 and done.config.inner_adam_state == "task"
    with pytest.raises(CheckpointError, match="inner_adam_state: checkpoint 'task' vs now "
                                              "'carried'"):
        train(progress=False, checkpoint=tmp_path / "a.pt", resume=True,
              **{**cfg, "iterations": 14, "inner_adam_state": None})


def test_resume_from_a_different_config_is_refused(tmp_path):
    train(progress=False, checkpoint=tmp_path / "a.pt", **{**FAST, "iterations": 10})
    with pytest.raises(CheckpointError, match="inner_lr: checkpoint 0.01 vs now 0.05"):
        train(progress=False, checkpoint=tmp_path / "a.pt", resume=True, inner_lr=0.05, **FAST)


def test_corrupt_and_truncated_checkpoints_give_clear_errors(tmp_path):
    train(progress=False, checkpoint=tmp_path / "a.pt", **{**FAST, "iterations": 10})
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a metalearn checkpoint"):
        load_checkpoint(tmp_path / "t.pt")
    (tmp_path / "g.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoints_never_execute_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"format": 1, "x": torch.ones(2)})

    def failing_write(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing_write)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it


def test_early_stopping_with_patience():
    # A learning rate so small that validation cannot improve after the first check.
    result = train(progress=False, **{**FAST, "iterations": 200, "outer_lr": 1e-12,
                                      "patience": 2})
    assert result.stopped_early
    assert result.iteration == 30


def test_non_finite_loss_stops_with_the_iteration(tmp_path):
    with pytest.raises(NonFiniteError, match="at iteration"):
        train(progress=False, **{**FAST, "inner_lr": 1e30, "inner_steps": 3})


def test_outer_optimizers_and_schedules():
    for name in ("sgd", "momentum", "adagrad", "adam"):
        result = train(progress=False, **{**FAST, "iterations": 5, "val_every": 5,
                                          "outer_optimizer": name, "weight_decay": 1e-4})
        assert result.iteration == 5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = build_schedule(TrainConfig(iterations=10, schedule="linear").resolved(), opt)
    lrs = []
    for _ in range(10):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == pytest.approx(0.9) and lrs[-1] == pytest.approx(0.0)


def test_config_defaults_follow_the_papers_and_bad_values_are_named():
    o = TrainConfig(dataset="omniglot").resolved()
    assert (o.meta_batch, o.inner_lr, o.inner_steps, o.outer_optimizer, o.outer_lr) == \
        (32, 0.4, 1, "adam", 1e-3)
    s = TrainConfig().resolved()
    assert (s.inner_lr, s.meta_batch) == (0.01, 25)
    r = TrainConfig(dataset="omniglot", algorithm="reptile").resolved()
    assert (r.inner_optimizer, r.inner_batch, r.schedule, r.meta_batch) == \
        ("adam", 10, "linear", 5)
    with pytest.raises(ValueError, match="unknown algorithm 'mamal'"):
        TrainConfig(algorithm="mamal").resolved()
    with pytest.raises(ValueError, match="ways must be an integer >= 1"):
        TrainConfig(ways=0).resolved()
    with pytest.raises(ValueError, match="outer_lr must be a finite number > 0"):
        TrainConfig(outer_lr=-1.0).resolved()


def test_train_is_exported_at_top_level():
    assert metalearn.train is train


@pytest.mark.parametrize("algorithm", ["metasgd", "mamlpp"])
def test_learned_inner_rates_are_trained_checkpointed_and_resumed(tmp_path, algorithm):
    cfg = dict(FAST, algorithm=algorithm, iterations=20)
    full = train(progress=False, checkpoint=tmp_path / "a.pt", **cfg)
    init = train(progress=False, **{**cfg, "iterations": 1, "outer_lr": 1e-12})
    learned = dict(full.learner.learned.named_parameters())
    assert learned and any(
        not torch.allclose(p, dict(init.learner.learned.named_parameters())[n])
        for n, p in learned.items())
    saved = load_checkpoint(tmp_path / "a.pt")["learner"]
    for n, p in full.learner.learned.state_dict().items():
        torch.testing.assert_close(saved[n], p)
    train(progress=False, checkpoint=tmp_path / "b.pt", **{**cfg, "iterations": 10})
    resumed = train(progress=False, checkpoint=tmp_path / "b.pt", resume=True, **cfg)
    for n, p in full.learner.learned.state_dict().items():
        torch.testing.assert_close(resumed.learner.learned.state_dict()[n], p, rtol=0, atol=0)
    for n, p in params_of(full.model).items():
        torch.testing.assert_close(params_of(resumed.model)[n], p, rtol=0, atol=0)


def test_resume_survives_a_log_line_cut_short_by_a_kill(tmp_path):
    train(progress=False, checkpoint=tmp_path / "a.pt", **{**FAST, "iterations": 10})
    log = tmp_path / "a.jsonl"
    log.write_text(log.read_text() + '{"iteration": 11, "split": "tr')  # killed mid-write
    resumed = train(progress=False, checkpoint=tmp_path / "a.pt", resume=True, **FAST)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert resumed.iteration == 30 and lines[-1]["iteration"] == 30


def test_a_log_file_replaced_during_the_run_gets_the_later_records(tmp_path):
    # As a git stash or checkout does to a run writing inside a repository: the file at
    # the log's path is replaced by another one while the run goes on.
    from metalearn.data import SineTasks

    log = tmp_path / "a.jsonl"

    class Replacing(SineTasks):
        calls = 0

        def sample(self, n):
            Replacing.calls += 1
            if Replacing.calls == 15:
                first = log.read_text().splitlines()[0]
                log.unlink()
                log.write_text(first + "\n")
            return super().sample(n)

    train(progress=False, checkpoint=tmp_path / "a.pt", train_sampler=Replacing(seed=0),
          val_sampler=SineTasks(seed=1), log_every=5, **FAST)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["iteration"], r["split"]) for r in lines] == [
        (5, "train"), (15, "train"), (20, "train"), (20, "val"), (25, "train"),
        (30, "train"), (30, "val")]


def test_each_rank_validates_only_its_share_of_the_tasks(monkeypatch):
    # Rank 1 of 2, without a process group: the collectives are stand-ins that record what
    # this rank evaluated and hand back the whole table as rank 0 and 1 together would.
    from metalearn import training
    from metalearn.distributed import DistContext

    evaluated, gathered = [], []
    real_evaluate = training.evaluate

    def spy_evaluate(learner, tasks, **kwargs):
        evaluated.append(tasks)
        return real_evaluate(learner, tasks, **kwargs)

    class SecondRank(DistContext):
        def reduce_gradients(self, params, weight):
            pass

        def reduce_metrics(self, metrics, weight):
            return metrics

        def gather_tasks(self, rows, tasks):
            gathered.append(rows)
            return torch.cat([torch.zeros(tasks - len(rows), rows.shape[1]), rows])

    monkeypatch.setattr(training.DistContext, "from_env",
                        classmethod(lambda cls, device: SecondRank(1, 2, torch.device(device))))
    monkeypatch.setattr(training, "evaluate", spy_evaluate)
    result = train(progress=False, **{**FAST, "iterations": 10, "val_tasks": 7})
    # 7 tasks over 2 ranks: rank 0 takes tasks 0-3, rank 1 tasks 4-6.
    reference = training.build_sampler(result.config, "val", seed=result.config.seed + 1_000_003,
                                       evaluation=True).sample(7)
    assert len(evaluated) == 1 and len(evaluated[0]) == 3
    torch.testing.assert_close(evaluated[0].support_x, reference.support_x[4:], rtol=0, atol=0)
    assert gathered[0].shape[0] == 3
    val = [r for r in result.history if r["split"] == "val"][0]
    # The logged mean is over the gathered 7 rows (4 stand-in zeros), not rank 1's 3 alone.
    assert val["mse"] == pytest.approx(gathered[0][:, -1].sum().item() / 7)


def test_fewer_validation_tasks_than_ranks_is_a_clear_error(monkeypatch):
    from metalearn import training
    from metalearn.distributed import DistContext

    monkeypatch.setattr(training.DistContext, "from_env",
                        classmethod(lambda cls, device: DistContext(0, 4, torch.device(device))))
    with pytest.raises(ValueError, match=r"val_tasks=3 is smaller than the 4 processes"):
        train(progress=False, **{**FAST, "val_tasks": 3})
