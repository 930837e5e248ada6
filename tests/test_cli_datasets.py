"""The image benchmarks in the configuration and the command: paper defaults, checks, the
model, and train + eval (+ search, bench) through ``metalearn`` on each from a fixture."""

from __future__ import annotations

import json

import pytest
import torch

from metalearn.cli import main
from metalearn.config import BENCHMARKS, TrainConfig, build_model, build_sampler
from metalearn.data import image_sets
from tests import benchmark_fixtures as fx

FIXTURES = {
    "mini-imagenet": lambda root: fx.mini_pickles(root / "mini-imagenet"),
    "tiered-imagenet": lambda root: fx.tiered(root / "tiered-imagenet"),
    "cifar-fs": lambda root: fx.cifar100(root / "cifar100", archive=True),
    "fc100": lambda root: fx.cifar100(root / "cifar100"),
}
SMALL = ["--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2",
         "--inner-steps", "1", "--val-every", "1", "--val-tasks", "2", "--no-progress"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(image_sets, "_ALLOW_SUBSET", True)  # the fixtures are subsets
    return tmp_path


def test_maml_paper_defaults_on_mini_imagenet():
    one = TrainConfig(dataset="mini-imagenet").resolved()
    assert (one.ways, one.shots, one.queries, one.meta_batch, one.inner_lr, one.inner_steps,
            one.eval_steps, one.outer_optimizer, one.outer_lr) == (
        5, 1, 15, 4, 0.01, 5, 10, "adam", 1e-3)
    five = TrainConfig(dataset="mini-imagenet", shots=5).resolved()
    assert five.meta_batch == 2 and five.queries == 15
    assert TrainConfig(dataset="mini-imagenet", shots=5, meta_batch=8).resolved().meta_batch == 8
    reptile = TrainConfig(dataset="mini-imagenet", algorithm="reptile").resolved()
    assert (reptile.shots, reptile.inner_steps, reptile.inner_batch, reptile.eval_steps,
            reptile.eval_inner_batch, reptile.meta_batch) == (15, 8, 10, 50, 5, 5)
    for name in BENCHMARKS:
        cfg = TrainConfig(dataset=name).resolved()
        assert cfg.resolved() == cfg  # idempotent


@pytest.mark.parametrize("dataset, size", [("mini-imagenet", 84), ("tiered-imagenet", 84),
                                           ("cifar-fs", 32), ("fc100", 32)])
def test_the_model_is_maml_s_miniimagenet_conv4(dataset, size):
    model = build_model(TrainConfig(dataset=dataset).resolved())
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 5)
    assert model.features[0].out_channels == 32
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in model.features)


@pytest.mark.parametrize("kwargs, text", [
    (dict(dataset="mini-imagenet", ways=17), "exceeds the 16 classes of the miniImageNet "
                                             "validation split; use ways <= 16"),
    (dict(dataset="fc100", shots=590, queries=15), r"shots \+ queries = 590 \+ 15 = 605, but "
                                                   "each FC100 class has only 600 images"),
    (dict(dataset="tiered-imagenet", ways=98), "use ways <= 97"),
])
def test_impossible_settings_are_config_errors(kwargs, text):
    with pytest.raises(ValueError, match=text):
        TrainConfig(**kwargs).resolved()


@pytest.mark.parametrize("dataset", list(FIXTURES))
def test_train_then_eval_through_the_command(env, dataset, capsys):
    root = env / "data"
    FIXTURES[dataset](root)
    ckpt = env / "run.pt"
    code = main(["train", "--dataset", dataset, "--data-root", str(root), "--iterations", "2",
                 "--checkpoint", str(ckpt), *SMALL])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "trained 2 iterations" in out.out and "accuracy" in out.out
    saved = torch.load(ckpt, weights_only=False)
    assert saved["config"]["dataset"] == dataset and set(saved["sampler"]) == {"generator"}
    result = env / "eval.json"
    code = main(["eval", "--checkpoint", str(ckpt.with_suffix(".best.pt")), "--steps", "1",
                 "--tasks", "3", "--out", str(result), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    payload = json.loads(result.read_text())
    assert payload["metric"] == "accuracy" and len(payload["mean"]) == 2
    assert payload["config"]["dataset"] == dataset


def test_search_and_bench_on_an_image_benchmark(env, capsys):
    root = env / "data"
    fx.cifar100(root / "cifar100")
    common = ["--dataset", "cifar-fs", "--data-root", str(root), "--iterations", "1", *SMALL]
    code = main(["search", "--grid", "inner_lr=0.01,0.1", "--out", str(env / "s.json"),
                 *common])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads((env / "s.json").read_text())["trials"]) == 2
    code = main(["bench", "--algorithms", "fomaml", "--tasks", "2", "--eval-steps", "1",
                 "--inner-steps-list", "1", "--out", str(env / "b.json"), "--dataset",
                 "cifar-fs", "--data-root", str(root), "--iterations", "1", "--ways", "3",
                 "--shots", "1", "--queries", "2", "--meta-batch", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((env / "b.json").read_text())["records"]


@pytest.mark.parametrize("dataset, text", [
    ("cifar-fs", "add --download"),
    ("mini-imagenet", "no public download"),
    ("tiered-imagenet", "no public download"),
])
def test_missing_data_is_worded_in_flags(env, dataset, text, capsys):
    code = main(["train", "--dataset", dataset, "--data-root", str(env / "nothing"),
                 "--iterations", "1", "--checkpoint", str(env / "c.pt")])
    err = capsys.readouterr().err
    assert code == 1 and text in err and str(env / "nothing") in err
    assert "--data-root" in err and "download=True" not in err and "root=" not in err
    assert "Traceback" not in err


def test_the_cli_download_fetches_cifar100(env, capsys, monkeypatch):
    import threading
    from http.server import ThreadingHTTPServer

    from tests.test_benchmark_loaders import _Handler  # the loopback server's handler

    fx.cifar100(env / "served", archive=True)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.body = (env / "served" / "cifar-100-python.tar.gz").read_bytes()
    srv.mode, srv.requests = "ok", []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("METALEARN_CIFAR100_URL",
                           f"http://127.0.0.1:{srv.server_address[1]}/c.tar.gz")
        code = main(["train", "--dataset", "fc100", "--data-root", str(env / "data"),
                     "--download", "--iterations", "1", "--checkpoint", str(env / "c.pt"),
                     *SMALL])
        assert code == 0, capsys.readouterr().err
        assert srv.requests == ["/c.tar.gz"]
        assert (env / "data" / "cifar100" / "cifar-100-python.tar.gz").is_file()
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def test_build_sampler_gives_the_benchmark_sampler(env):
    root = env / "data"
    fx.mini_pickles(root / "mini-imagenet")
    cfg = TrainConfig(dataset="mini-imagenet", data_root=str(root), ways=3, queries=2).resolved()
    tasks = build_sampler(cfg, "val", seed=5, evaluation=True)
    assert type(tasks).__name__ == "MiniImageNetTasks" and tasks.split == "val"
    assert tasks.sample(2).support_x.shape == (2, 3, 3, 84, 84)
