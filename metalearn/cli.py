"""The ``metalearn`` command: train, eval, bench, search and plot."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from metalearn.config import ALGORITHMS, DATASETS, OUTER_OPTIMIZERS, SCHEDULES, TrainConfig
from metalearn.evaluation import format_metric


def _number(kind: type, minimum: float, strict: bool):
    """An argparse type: ``kind`` (int or float), finite, > or >= ``minimum``."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        bad = value <= minimum if strict else value < minimum
        if bad or value != value or value in (float("inf"), float("-inf")):
            if kind is int:
                bound = minimum + 1 if strict else minimum
                raise argparse.ArgumentTypeError(f"must be >= {bound}, got {value}")
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>' if strict else '>='} {minimum:g}, got {text}")
        return value

    return parse


_positive_int = _number(int, 0, strict=True)
_non_negative_int = _number(int, 0, strict=False)
_positive_float = _number(float, 0.0, strict=True)
_non_negative_float = _number(float, 0.0, strict=False)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    """Seconds from ``3600``, ``3600s``, ``90m`` or ``2.5h``."""
    scale = _UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1] if scale else text) * (scale or 1.0)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a duration > 0 such as 3600, 90m or 2.5h, "
                                         f"got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4,8, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0 like 1,2,4,8, got {text!r}")
    return values


def _algorithm_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in ALGORITHMS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown algorithm(s) {unknown or text!r}; choose from {','.join(ALGORITHMS)}")
    return names


def _add_run_options(p: argparse.ArgumentParser, iterations_help: str) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--dataset", choices=DATASETS, default="sine",
                   help="the task family (default sine, which needs no download)")
    g.add_argument("--ways", type=_positive_int, default=5,
                   help="classes per task (the image datasets; default 5)")
    g.add_argument("--shots", type=_positive_int, help="support examples per class (per task "
                   "for sine); default from the paper")
    g.add_argument("--queries", type=_positive_int, help="query examples per class (per task "
                   "for sine); default: as many as shots")
    g.add_argument("--meta-batch", type=_positive_int, help="tasks per meta-iteration")
    g.add_argument("--iterations", type=_positive_int, help=iterations_help)
    g.add_argument("--train-classes", type=_positive_int, metavar="N", help="meta-train on "
                   "only N classes of the training split (Omniglot: characters), a fixed "
                   "subset that does not depend on --seed; validation and test unchanged "
                   "(default: all)")
    g.add_argument("--data-root", help="folder holding the dataset's folder: omniglot/, "
                   "mini-imagenet/, tiered-imagenet/ or cifar100/ (default: $METALEARN_DATA, "
                   "then ~/.cache/metalearn)")
    g.add_argument("--download", action="store_true", help="download the dataset into the "
                   "data folder if it is missing (verified before use): the Omniglot zips or "
                   "the CIFAR-100 archive (cifar-fs, fc100); miniImageNet and tieredImageNet "
                   "have no public download")
    a = p.add_argument_group("inner loop")
    a.add_argument("--inner-lr", type=_positive_float, help="inner (adaptation) learning "
                   "rate; default from the paper")
    a.add_argument("--inner-steps", type=_non_negative_int, help="inner steps in training; "
                   "default from the paper")
    a.add_argument("--inner-batch", type=_positive_int, help="Reptile: examples per inner "
                   "mini-batch (default: the whole support set)")
    a.add_argument("--inner-optimizer", choices=("sgd", "adam"), help="Reptile's inner optimizer")
    a.add_argument("--inner-adam-state", choices=("carried", "task"), help="Reptile with Adam: "
                   "carry Adam's moments across tasks, as the reference code does (carried, "
                   "the default), or start them fresh for every task (task)")
    a.add_argument("--inner-flood", type=_non_negative_float, help="flood level b of the "
                   "inner loss: each task's support loss, or each support example's with "
                   "iFlood (0 = off)")
    a.add_argument("--flood-mode", choices=("batch", "instance"), default="batch",
                   help="batch = flooding (Ishida et al.), instance = iFlood (Xie et al.)")
    a.add_argument("--outer-flood", type=_non_negative_float, help="flood level b of the "
                   "outer loss: the meta-batch's mean query loss, or each query example's "
                   "with iFlood (default: off)")
    a.add_argument("--label-smoothing", type=_non_negative_float, default=0.0,
                   help="label smoothing of the classification losses (default 0)")
    o = p.add_argument_group("outer loop")
    o.add_argument("--outer-optimizer", choices=OUTER_OPTIMIZERS, help="the meta optimizer "
                   "(default: Adam; Reptile: SGD)")
    o.add_argument("--outer-lr", type=_positive_float, help="meta learning rate (Reptile: the "
                   "meta step size epsilon)")
    o.add_argument("--outer-eps", type=_positive_float, help="the outer Adam's epsilon "
                   "(default 1e-8; iMAML's reference code uses 1e-3)")
    o.add_argument("--weight-decay", type=_non_negative_float, default=0.0,
                   help="the meta optimizer's weight decay (default 0)")
    o.add_argument("--schedule", choices=SCHEDULES, help="meta lr schedule (Reptile: linear)")
    v = p.add_argument_group("MAML variants (each option applies only to its algorithm)")
    v.add_argument("--first-order", action="store_true", default=None, help="metasgd, anil, "
                   "mamlpp: first-order meta-gradient")
    v.add_argument("--memory-saving", action="store_true", default=None, help="maml: "
                   "recompute inner-step activations in the backward; the same meta-gradient "
                   "with memory nearly flat in inner steps, for some extra time")
    v.add_argument("--anil-inner", help="anil: comma-separated names or prefixes of the "
                   "parameters the inner loop adapts (default: the last layer's)")
    v.add_argument("--imaml-lambda", type=_positive_float, help="imaml: proximal strength "
                   "lambda (default 2.0 on omniglot, the paper's; 1.0 on sine)")
    v.add_argument("--cg-steps", type=_non_negative_int, help="imaml: conjugate-gradient "
                   "steps (default 5; 0 = first order)")
    v.add_argument("--imaml-inner-solve", choices=("proximal", "pullback"), help="imaml: "
                   "proximal = the paper's inner problem (default); pullback = its reference "
                   "code's plain steps then one pull-back step (evaluation then adapts with "
                   "lambda 0, as that code tests)")
    v.add_argument("--cg-damping", type=_non_negative_float, help="imaml: the reference "
                   "code's cg_damping, adds it times I to the CG matrix (default 0)")
    v.add_argument("--lam-damping", type=_non_negative_float, help="imaml: the reference "
                   "code's lam_damping, divides H by lambda + it (default 0)")
    v.add_argument("--lslr", action=argparse.BooleanOptionalAction, help="mamlpp: per-layer "
                   "per-step learnable inner lrs (default on)")
    v.add_argument("--msl", dest="multi_step_loss", action=argparse.BooleanOptionalAction,
                   help="mamlpp: multi-step loss (default on)")
    v.add_argument("--msl-iterations", type=_positive_int, help="mamlpp: iterations over "
                   "which the multi-step loss anneals to the last step (default 5000)")
    v.add_argument("--first-order-iterations", type=_non_negative_int, help="mamlpp: "
                   "derivative-order annealing, first order for this many iterations "
                   "(default 0)")
    v.add_argument("--per-step-bn", action=argparse.BooleanOptionalAction, help="mamlpp: "
                   "per-step BatchNorm weights and biases (default on). MAML++'s cosine "
                   "meta-lr annealing is --schedule cosine")
    m = p.add_argument_group("model and run")
    m.add_argument("--init", choices=("xavier", "he"), default="xavier",
                   help="initial weights of the model (default xavier)")
    m.add_argument("--dropout", type=_non_negative_float, default=0.0,
                   help="dropout rate of the model (default 0)")
    m.add_argument("--backbone", choices=("conv4", "resnet12"), help="the network: the "
                   "dataset's Conv4 (default; the MLP for sine), or resnet12 (Lee et al. "
                   "2019, 12.4M parameters) for the RGB benchmarks")
    m.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_process_options(m)


def _add_process_options(p) -> None:
    p.add_argument("--no-malloc-reuse", action="store_true", help="leave glibc's allocator "
                   "as it is (by default freed memory is kept for reuse: up to 2.3x faster "
                   "on CPU with large query sets, and the process keeps its peak memory; see "
                   "metalearn.allocator)")
    p.add_argument("--compile", action="store_true", help="run the first-order inner loops "
                   "(FOMAML, Reptile, evaluation's adaptation) through torch.compile: "
                   "1.1-1.9x faster per iteration after a first call of 1-2 minutes on CPU "
                   "(seconds once inductor's cache is warm), so for long runs; the results "
                   "are the same to rounding (see metalearn.kernels.compiled)")


def _config_from(args: argparse.Namespace, **extra) -> TrainConfig:
    keys = ("dataset", "ways", "shots", "queries", "meta_batch", "iterations", "data_root",
            "inner_lr", "inner_steps", "inner_batch", "inner_optimizer", "inner_adam_state",
            "inner_flood", "flood_mode", "outer_flood", "label_smoothing", "outer_optimizer",
            "outer_lr", "outer_eps", "weight_decay", "schedule", "init", "dropout", "backbone",
            "seed", "device")
    keys += ("first_order", "anil_inner", "imaml_lambda", "cg_steps", "imaml_inner_solve",
             "cg_damping", "lam_damping", "lslr", "multi_step_loss", "msl_iterations",
             "first_order_iterations", "per_step_bn")
    keys += ("memory_saving", "train_classes")
    values = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    values.update(extra)
    return TrainConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalearn", allow_abbrev=False,
        description="Meta-learning: MAML, FOMAML, Reptile, Meta-SGD, ANIL, MAML++ and iMAML.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # No prefix matching anywhere: a misspelled --iteration must not pass as --iterations.

    tr = sub.add_parser("train", allow_abbrev=False,
                        help="meta-train a model", description="Meta-train with "
                        "the papers' defaults; validation, checkpoints and resume.")
    tr.add_argument("--algorithm", choices=ALGORITHMS, default="maml",
                    help="the meta-learner (default maml)")
    _add_run_options(tr, "meta-iterations (default: the paper's schedule)")
    tr.add_argument("--checkpoint", type=Path, help="checkpoint path (default: "
                    "runs/<dataset>_<algorithm>.pt)")
    tr.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="start afresh on a --checkpoint "
                    "that already holds a run, deleting its checkpoint, best model and log "
                    "(without it, or --resume, such a path is refused)")
    tr.add_argument("--val-every", type=_positive_int, default=500,
                    help="meta-iterations between validations (default 500)")
    tr.add_argument("--val-tasks", type=_positive_int, default=100,
                    help="fixed validation tasks (default 100)")
    tr.add_argument("--patience", type=_positive_int, help="stop after this many validations "
                    "without improvement")
    tr.add_argument("--time-limit", type=_duration, help="stop at the first validation after "
                    "this much wall-clock (3600, 90m, 2.5h), with the checkpoint written; "
                    "--resume continues the run")

    ev = sub.add_parser("eval", allow_abbrev=False,
                        help="evaluate a checkpoint per inner-step count",
                        description="Adaptation accuracy (or MSE) after 0..K inner steps, "
                        "mean and 95% CI over fixed test tasks.")
    ev.add_argument("--checkpoint", type=Path, required=True,
                    help="a checkpoint of metalearn train (RUN.pt or RUN.best.pt)")
    ev.add_argument("--steps", type=_non_negative_int, default=10, help="K (default 10)")
    ev.add_argument("--tasks", type=_positive_int, default=600,
                    help="fixed tasks to evaluate on (default 600)")
    ev.add_argument("--split", choices=("test", "val", "train"), default="test",
                    help="the split the tasks come from (default test)")
    ev.add_argument("--non-transductive", action="store_true", help="predict each query with "
                    "the support set only (Reptile's protocol)")
    ev.add_argument("--seed", type=int, default=12345, help="seed of the test task set")
    ev.add_argument("--data-root", help="folder holding the dataset's folder (default: the "
                    "checkpoint's, then $METALEARN_DATA, then ~/.cache/metalearn)")
    ev.add_argument("--download", action="store_true", help="download the dataset if it is "
                    "missing (Omniglot, CIFAR-100)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ev.add_argument("--out", type=Path, help="write the result as JSON")
    ev.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_process_options(ev)

    be = sub.add_parser("bench", allow_abbrev=False,
                        help="compare MAML, FOMAML and Reptile",
                        description="Short meta-training of each algorithm, then accuracy/MSE "
                        "per inner step, memory per inner-step count and speed.")
    be.add_argument("--algorithms", type=_algorithm_list, default=["maml", "fomaml", "reptile"],
                    help=f"comma-separated, from {','.join(ALGORITHMS)} (default: "
                    "maml,fomaml,reptile)")
    be.add_argument("--inner-steps-list", "--steps-list", dest="steps_list", type=_int_list,
                    default=[1, 2, 4, 8], help="inner-step counts for the memory profile")
    be.add_argument("--eval-steps", type=_non_negative_int, default=10,
                    help="the most inner steps at test time (default 10)")
    be.add_argument("--tasks", type=_positive_int, default=600, help="test tasks")
    be.add_argument("--full", action="store_true", help="the papers' full schedules")
    be.add_argument("--out", type=Path, default=Path("runs") / "bench_results.json",
                    help="results JSON, the plot beside it (default runs/bench_results.json)")
    _add_run_options(be, "meta-iterations per algorithm (default 1000 for sine, 300 for "
                     "omniglot; --full for the paper's)")

    se = sub.add_parser("search", allow_abbrev=False,
                        help="hyperparameter search on the validation split",
                        description="Train one run per grid point (or per random draw with "
                        "--trials) and rank them by their best validation value; the test "
                        "split is not used. Example: metalearn search --grid inner_lr=0.005,"
                        "0.01,0.02 --grid outer_lr=1e-3,3e-3 --iterations 500")
    se.add_argument("--algorithm", choices=ALGORITHMS, default="maml",
                    help="the meta-learner (default maml)")
    se.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2,...",
                    help="a setting (as in TrainConfig: inner_lr, inner_steps, outer_lr, ...) "
                    "and its values; repeat for more settings, the grid is their product")
    se.add_argument("--trials", type=_positive_int, help="random search: this many distinct "
                    "grid points (default: the whole grid)")
    se.add_argument("--seeds", type=_int_list, help="run each point with these seeds and rank "
                    "by the mean (default: --seed)")
    se.add_argument("--val-every", type=_positive_int, default=500,
                    help="meta-iterations between validations (default 500)")
    se.add_argument("--val-tasks", type=_positive_int, default=100,
                    help="fixed validation tasks (default 100)")
    se.add_argument("--patience", type=_positive_int, help="early stopping within each trial")
    se.add_argument("--runs", type=Path, help="folder for each trial's checkpoints and logs "
                    "(default: none kept)")
    se.add_argument("--out", type=Path, default=Path("search_results.json"),
                    help="JSON of all trials, rewritten after each (default "
                    "search_results.json)")
    se.add_argument("--resume", action="store_true", help="reuse the trials already in --out "
                    "that had the same settings")
    _add_run_options(se, "meta-iterations per trial (default: the paper's schedule)")
    pl = sub.add_parser("plot", allow_abbrev=False,
                        help="draw runs' training and validation curves to a PNG",
                        description="Training loss and validation accuracy (%) or MSE with "
                        "its 95% CI against meta-iterations, from the JSON-lines logs that "
                        "train writes beside its checkpoint (RUN.jsonl for --checkpoint "
                        "RUN.pt). Several logs overlay. Example: metalearn plot "
                        "runs/omniglot_maml.jsonl runs/omniglot_fomaml.jsonl")
    pl.add_argument("logs", nargs="+", type=Path, metavar="RUN.jsonl",
                    help="training logs (one or more)")
    pl.add_argument("--out", type=Path, help="the PNG to write (default: the first log's "
                    "path with .png)")
    pl.add_argument("--labels", type=lambda t: [x.strip() for x in t.split(",")],
                    help="comma-separated legend labels, one per log (default: file names)")
    pl.set_defaults(no_malloc_reuse=True)  # nothing to train: leave the allocator alone
    for p in (tr, ev, be, se, pl):  # errors found after parsing print this command's usage
        p.set_defaults(command_parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # the subcommand's usage, not the top level's
        args.command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if not args.no_malloc_reuse:
        from metalearn.allocator import reuse_freed_memory

        reuse_freed_memory()
    parser = args.command_parser
    _one_line_cache_warnings(args.command)
    from metalearn.kernels import kernel_settings

    with kernel_settings(compile=getattr(args, "compile", False)):
        return _run_command(args, parser)


def _run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from metalearn.checkpoint import CheckpointError
    from metalearn.data.image_sets import DatasetError
    from metalearn.data.omniglot_archive import OmniglotError

    try:
        _fetch_data(args)
        if args.command == "train":
            return _train(args, parser)
        if args.command == "eval":
            return _eval(args)
        if args.command == "search":
            return _search(args, parser)
        if args.command == "plot":
            return _plot(args)
        return _bench(args, parser)
    except (FileNotFoundError, OmniglotError, DatasetError, CheckpointError) as err:
        advice = (" (or start without --resume)" if isinstance(err, CheckpointError)
                  and getattr(args, "resume", False) else "")
        data_error = isinstance(err, (OmniglotError, DatasetError))
        text = _cli_words(str(err)) if data_error else str(err)
        print(f"metalearn {args.command}: error: {text}{advice}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nmetalearn {args.command}: interrupted; checkpoints on disk are intact",
              file=sys.stderr)
        return 130


def _cli_words(message: str) -> str:
    """The data errors' advice in the command's words: flags, not the library's arguments."""
    for library, flag in (("pass download=True", "add --download"),
                          ("with download=True", "with --download"),
                          ("Re-run with download=True", "Re-run with --download"),
                          ("pass its parent as root=", "pass its parent with --data-root"),
                          ("point root= / METALEARN_DATA", "point --data-root / METALEARN_DATA"),
                          ("pass root= (or set", "pass --data-root (or set"),
                          ("or pass url= / set METALEARN_OMNIGLOT_URL",
                           "or set METALEARN_OMNIGLOT_URL"),
                          ("or pass url= / set METALEARN_CIFAR100_URL",
                           "or set METALEARN_CIFAR100_URL"),
                          ("pass url= / set METALEARN_CIFAR100_URL",
                           "set METALEARN_CIFAR100_URL")):
        message = message.replace(library, flag)
    return message


def _flag_words(message: str, parser: argparse.ArgumentParser) -> str:
    """A config error in the command's words: the setting it starts with as its flag."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions
             if a.option_strings and a.option_strings[0].startswith("--")}
    name = re.match(r"(\w+) (applies to|must be)", message)
    if name and name.group(1) in flags:
        message = flags[name.group(1)] + message[len(name.group(1)):]
    return (message.replace(" applies to algorithm=", " applies to --algorithm ")
            .replace("; leave it unset", "; leave it out"))


def _fetch_data(args, dataset: str | None = None) -> None:
    """``--download``: fetch the dataset's missing files before anything is built: the
    Omniglot zips (for sine and omniglot, as before), or the CIFAR-100 archive. eval
    passes the checkpoint's dataset; train, bench and search have ``--dataset``."""
    if not getattr(args, "download", False):
        return
    dataset = dataset or getattr(args, "dataset", None)
    if args.command == "eval" and dataset is None:
        return  # fetched in _eval, once the checkpoint names its dataset
    if dataset in ("cifar-fs", "fc100"):
        from metalearn.data.cifar100 import download

        download(args.data_root, progress=not args.no_progress)
    elif dataset in ("mini-imagenet", "tiered-imagenet"):
        pass  # no public download: the sampler's not-found message says where to get it
    else:
        from metalearn.data.omniglot_archive import download_archives

        download_archives(args.data_root, progress=not args.no_progress)


def _one_line_cache_warnings(command: str) -> None:
    """Print a rebuilt cache as one ``metalearn CMD: warning: ...`` line, not Python's
    two-line warning with a source line; other warnings keep their usual form."""
    import warnings

    from metalearn.data.array_cache import CacheWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CacheWarning):
            print(f"metalearn {command}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _train(args, parser) -> int:
    from metalearn.run_files import CLI, CheckpointBusyError, CheckpointPathError
    from metalearn.training import NonFiniteError, train

    try:
        cfg = _config_from(args, val_every=args.val_every, val_tasks=args.val_tasks,
                           patience=args.patience, algorithm=args.algorithm).resolved()
    except ValueError as err:
        parser.error(_flag_words(str(err), parser))
    ckpt = args.checkpoint or Path("runs") / f"{cfg.dataset}_{cfg.algorithm}.pt"
    try:  # the path is checked and locked before the first iteration
        result = train(cfg, checkpoint=ckpt, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress, time_limit=args.time_limit)
    except CheckpointPathError as err:
        parser.error(err.worded(CLI))
    except CheckpointBusyError as err:  # not a usage error: the same command works later
        print(f"metalearn train: error: {err.worded(CLI)}", file=sys.stderr)
        return 1
    except NonFiniteError as err:
        print(f"metalearn train: error: {err}", file=sys.stderr)
        return 1
    best = result.best or {}
    value = (format_metric(best["metric"], best["value"], best.get("ci95")) if best
             else "none (no finite validation value)")
    print(f"trained {result.iteration} iterations; best validation {best.get('metric', '')} "
          f"{value} at iteration {best.get('iteration')}"
          f"{' (early stop)' if result.stopped_early else ''}")
    if result.out_of_time:
        print(f"stopped at --time-limit after iteration {result.iteration} of "
              f"{cfg.iterations}; continue with --resume --checkpoint {ckpt}")
    print(f"checkpoint: {ckpt}  best: {ckpt.with_suffix('.best.pt')}  "
          f"log: {ckpt.with_suffix('.jsonl')}")
    return 0


def _eval(args) -> int:
    import json

    from metalearn.checkpoint import CheckpointError, atomic_write, load_checkpoint
    from metalearn.config import build_learner, build_model, evaluation_tasks
    from metalearn.evaluation import evaluate

    state = load_checkpoint(args.checkpoint)
    if state.get("user"):
        raise CheckpointError(
            f"{args.checkpoint} was trained with objects of your own "
            f"({', '.join(sorted(k for k in state['user'] if k != 'val_tasks'))}), which the "
            "command line cannot build; evaluate it in Python: load state['model'] into your "
            "model and call metalearn.evaluate")
    try:
        cfg = TrainConfig.from_dict(state["config"])
        cfg = TrainConfig(**{**cfg.to_dict(), "device": args.device,
                             "data_root": args.data_root or cfg.data_root}).resolved()
        model = build_model(cfg)
        model.load_state_dict(state["model"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{args.checkpoint} does not hold a usable model: "
                              f"{str(err).splitlines()[0]}") from None
    model.to(args.device)
    learner = build_learner(cfg, model, evaluation=True)
    if "learner" in state:
        try:  # Meta-SGD's / MAML++'s learned inner learning rates (and BN rows)
            learner.learned.load_state_dict(state["learner"])
        except RuntimeError as err:
            raise CheckpointError(f"{args.checkpoint} holds learner state that does not fit: "
                                  f"{str(err).splitlines()[0]}") from None
    if args.download:
        _fetch_data(args, cfg.dataset)
    tasks = evaluation_tasks(cfg, args.split, args.seed, args.tasks)
    result = evaluate(learner, **tasks, max_steps=args.steps,
                      transductive=not args.non_transductive, progress=not args.no_progress)
    print(f"{cfg.algorithm} on {cfg.dataset} {args.split} split, {args.tasks} tasks, "
          f"checkpoint iteration {state.get('iteration')}")
    print(result)
    if args.out:
        payload = {"checkpoint": str(args.checkpoint), "config": cfg.to_dict(),
                   **result.to_dict()}
        atomic_write(args.out, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    return 0


def _bench(args, parser) -> int:
    from metalearn.bench import run_bench

    base = _config_from(args)
    if base.memory_saving and set(args.algorithms) != {"maml"}:
        parser.error("--memory-saving applies to maml only; pass --algorithms maml")
    try:
        base.resolved()  # validate now; each algorithm then fills in its own paper defaults
    except ValueError as err:
        parser.error(_flag_words(str(err), parser))
    return run_bench(base, args.algorithms, out=args.out, iterations=args.iterations,
                     full=args.full, tasks=args.tasks, eval_steps=args.eval_steps,
                     steps_list=args.steps_list, progress=not args.no_progress)


def _search(args, parser) -> int:
    from metalearn.search import parse_space, search
    from metalearn.training import NonFiniteError

    try:
        space = parse_space(args.grid)  # --grid names the settings as TrainConfig does
    except ValueError as err:
        parser.error(str(err))
    try:
        base = _config_from(args, val_every=args.val_every, val_tasks=args.val_tasks,
                            patience=args.patience, algorithm=args.algorithm)
        base.resolved()
    except ValueError as err:
        parser.error(_flag_words(str(err), parser))
    try:
        result = search(base, space, trials=args.trials, seeds=args.seeds, runs=args.runs,
                        out=args.out, resume=args.resume, progress=not args.no_progress)
    except ValueError as err:  # a trial's settings, or --trials beyond the grid
        parser.error(str(err))
    except NonFiniteError as err:
        print(f"metalearn search: error: {err} (the trials before it are in {args.out})",
              file=sys.stderr)
        return 1
    direction = "higher" if result.higher_is_better else "lower"
    print(f"validation {result.metric} ({direction} is better), best first:")
    for row in result.ranking():
        point = ", ".join(f"{k}={v}" for k, v in row["point"].items())
        value = format_metric(result.metric, row["value"], row["ci95"])
        print(f"  {value}  {point}  ({row['seeds']} seed(s))")
    print(f"all trials: {args.out}")
    best = [t for t in result.trials if t["point"] == result.best["point"]]
    if best and best[0]["checkpoint"]:
        print(f"test the winner once: metalearn eval --checkpoint {best[0]['checkpoint']}")
    return 0


def _plot(args) -> int:
    from metalearn.plot_run import RunLogError, plot_runs

    out = args.out or args.logs[0].with_suffix(".png")
    try:
        path = plot_runs(args.logs, out, labels=args.labels)
    except RunLogError as err:
        if "labels for" in str(err):
            args.command_parser.error(f"--labels: {err}")
        print(f"metalearn plot: error: {err}", file=sys.stderr)
        return 1
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
