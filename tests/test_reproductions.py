"""The bookkeeping of the full-schedule runs (benchmarks/reproduce_omniglot.py): wall-clock
across restarts, the share of it that shared the CPU, and time to accuracy."""

from benchmarks.common import shared_share
from benchmarks.reproduce_omniglot import cumulative_seconds
from benchmarks.time_to_accuracy import first_reach


def test_cumulative_seconds_carry_over_a_restart():
    log = [{"split": "train", "iteration": 50, "seconds": 10.0},
           {"split": "train", "iteration": 100, "seconds": 20.0},
           {"split": "val", "iteration": 100, "accuracy": 0.5},
           # killed after 100 and resumed there: the new process's clock starts again
           {"split": "train", "iteration": 150, "seconds": 12.0},
           {"split": "val", "iteration": 150, "accuracy": 0.6}]
    assert cumulative_seconds(log) == [10.0, 20.0, 20.0, 32.0, 32.0]


def test_shared_share_counts_the_minutes_others_used_the_cpu():
    cpu = [{"seconds": 60, "other_cores": 0.0}, {"seconds": 60, "other_cores": 1.5},
           {"seconds": 120, "other_cores": 0.1}]
    assert shared_share(cpu) == 0.25
    assert shared_share([]) is None


def test_first_reach():
    points = [{"accuracy": 0.8, "iteration": 1}, {"accuracy": 0.96, "iteration": 2},
              {"accuracy": 0.94, "iteration": 3}]
    assert first_reach(points, 0.95)["iteration"] == 2
    assert first_reach(points, 0.97) is None


def test_idle_rate_keeps_only_the_intervals_no_other_process_shared():
    from benchmarks.reproduce_omniglot import idle_rate

    segments = [{"start_iteration": 0, "started": "2026-01-01T00:00:00+00:00"},
                {"start_iteration": 100, "started": "2026-01-01T01:00:00+00:00"}]
    log = [{"split": "train", "iteration": 50, "seconds": 10.0},
           {"split": "train", "iteration": 100, "seconds": 20.0},   # idle: 0.2 s/it
           {"split": "val", "iteration": 100, "accuracy": 0.5},
           {"split": "train", "iteration": 150, "seconds": 200.0},  # after the restart
           {"split": "train", "iteration": 200, "seconds": 300.0},  # shared: 2 s/it
           {"split": "train", "iteration": 250, "seconds": 305.0}]  # idle: 0.1 s/it
    cpu = [{"utc": "2026-01-01T00:01:00+00:00", "seconds": 60.0, "other_cores": 0.0},
           {"utc": "2026-01-01T00:02:00+00:00", "seconds": 60.0, "other_cores": 0.0},
           # the second process: shared in its 4th and 5th minute, idle after
           {"utc": "2026-01-01T01:04:00+00:00", "seconds": 60.0, "other_cores": 1.0},
           {"utc": "2026-01-01T01:05:00+00:00", "seconds": 60.0, "other_cores": 1.0},
           {"utc": "2026-01-01T01:07:00+00:00", "seconds": 120.0, "other_cores": 0.1}]
    rate = idle_rate(log, segments, cpu, margin=0.0)
    # 50->100 (10 s) and 200->250 (5 s) count; 100->150 spans the restart.
    assert rate["idle_intervals"] == 2 and rate["of_intervals"] == 3
    assert rate["seconds_per_iteration"] == 15.0 / 100
    # With a margin of two minutes, 200->250 touches the shared minutes and drops out.
    assert idle_rate(log, segments, cpu, margin=120.0)["seconds_per_iteration"] == 0.2
    assert idle_rate(log, segments, [], margin=0.0) is None


def test_the_last_checkpoint_is_tested_like_the_best_one(tmp_path, omniglot_images,
                                                          monkeypatch):
    """``--evaluate-last`` tests the model the reference code reports (the last one), on
    the same tasks and protocol as the best one."""
    import shutil

    import metalearn
    from benchmarks import reproduce_omniglot as ro

    monkeypatch.setattr(ro, "TEST_TASKS", 5)
    stem = tmp_path / "reptile_omniglot_5w1s"
    settings = dict(ro.RUNS["reptile"], val_every=2, val_tasks=5)
    metalearn.train(checkpoint=stem.with_suffix(".pt"), progress=False,
                    **dict(settings, iterations=2))
    shutil.copy(stem.with_suffix(".pt"), tmp_path / "at2.pt")
    metalearn.train(checkpoint=stem.with_suffix(".pt"), resume=True, progress=False,
                    **dict(settings, iterations=4))
    shutil.copy(tmp_path / "at2.pt", stem.with_suffix(".best.pt"))  # best at 2, last at 4

    best = ro.evaluate_best(stem, "reptile")
    last = ro.evaluate_best(stem, "reptile", suffix=".pt")
    assert (best["iteration"], last["iteration"]) == (2, 4)
    for result in (best, last):
        for protocol in ("transductive", "non_transductive"):
            assert result[protocol]["steps"] == list(range(51))
    assert last["transductive"]["accuracy"] != best["transductive"]["accuracy"]
