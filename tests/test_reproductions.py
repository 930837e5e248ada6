"""The bookkeeping of the full-schedule runs (benchmarks/reproduce_omniglot.py): wall-clock
across restarts, the share of it that shared the CPU, and time to accuracy."""

from benchmarks.reproduce_omniglot import cumulative_seconds, shared_share
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
