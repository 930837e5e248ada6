"""Plain-PyTorch copies of a meta-trained model that predict as :func:`~metalearn.evaluate` does.

Inside the learners, BatchNorm normalises with the statistics of the batch it is given, in
training and at test time, and its running buffers are never filled: this is the
transductive BatchNorm of the MAML papers (Finn et al. 2017 and the MAML reference code,
MAML++, Meta-SGD, ANIL; Nichol et al. 2018 point it out and also report a non-transductive
variant). A trained model loaded into plain PyTorch and put in ``eval()`` mode would
instead normalise with the unfilled running buffers (mean 0, variance 1), and predict
differently. :func:`export` returns a copy whose BatchNorm layers use batch statistics in
both modes, with the weights that :meth:`~metalearn.algorithms.base.MetaLearner.predict`
uses, including learned state that lives outside the model (MAML++'s per-step BatchNorm
weights).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from metalearn.algorithms.base import MetaLearner, check_steps
from metalearn.algorithms.functional_model import Params
from metalearn.algorithms.maml_plus_plus import MAMLPlusPlus

__all__ = ["export", "export_checkpoint", "batch_statistics_everywhere"]


def batch_statistics_everywhere(model: nn.Module) -> nn.Module:
    """Make every BatchNorm layer of ``model`` normalise with the statistics of its input
    batch in eval mode too, in place: no running buffers, none tracked.

    This is how the learners compute BatchNorm, and what ``nn.BatchNorm*d`` does when
    built with ``track_running_stats=False``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from metalearn.export import batch_statistics_everywhere
        >>> bn = batch_statistics_everywhere(nn.BatchNorm1d(2)).eval()
        >>> bn(torch.tensor([[1.0, 2.0], [3.0, 6.0]])).detach()
        tensor([[-1.0000, -1.0000],
                [ 1.0000,  1.0000]])
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return model


def _prediction_weights(learner: MetaLearner, fast: Params | None, steps: int | None
                        ) -> dict[str, torch.Tensor]:
    params = learner.fmodel.params()
    if fast is None:
        weights = {n: p.detach() for n, p in params.items()}
        if isinstance(learner, MAMLPlusPlus) and learner.bn_names:
            # The model's own BatchNorm affine is unused by MAML++; after k inner steps the
            # learner predicts with row k - 1 of its per-step tables (as adapt does).
            steps = learner.inner_steps if steps is None else check_steps("steps", steps)
            weights.update({n: t.detach() for n, t in learner._bn_at(max(steps - 1, 0)).items()})
        return weights
    if steps is not None:
        raise ValueError("steps applies only without fast (fast already holds the weights "
                         "after its inner steps, BatchNorm rows included); pass one of them")
    if not isinstance(fast, dict):
        raise TypeError(f"fast must be the dict of weights from learner.adapt(...), got "
                        f"{type(fast).__name__}")
    missing, extra = sorted(set(params) - set(fast)), sorted(set(fast) - set(params))
    if missing or extra:
        raise ValueError(f"fast does not fit the learner's model: missing {missing}, unknown "
                         f"{extra}; pass the weights that learner.adapt(...) returned")
    for n, p in params.items():
        if fast[n].shape != p.shape:
            if fast[n].shape[1:] == p.shape:
                raise ValueError(
                    f"fast holds the weights of {fast[n].shape[0]} tasks; export one task's: "
                    "export(learner, {k: v[i] for k, v in fast.items()})")
            raise ValueError(f"fast[{n!r}] has shape {tuple(fast[n].shape)}, but the model's "
                             f"parameter has {tuple(p.shape)}")
    return {n: fast[n].detach() for n in params}


def export(learner: MetaLearner, fast: Params | None = None, steps: int | None = None
           ) -> nn.Module:
    """A plain ``nn.Module`` that predicts what ``learner.predict(fast, x)`` (and so
    :func:`~metalearn.evaluate`, transductive) predicts.

    A deep copy of ``learner.model``, in eval mode (dropout off, as in ``evaluate``), with
    every BatchNorm layer normalising with the statistics of the batch it is given
    (:func:`batch_statistics_everywhere`): forward a task's queries together, as
    ``evaluate`` does. Its parameters are copies, trainable, so the copy can also be
    fine-tuned on a new task's support set with a plain optimiser (SGD with the learner's
    ``inner_lr`` for ``inner_steps`` steps adapts it as MAML does).

    The learned state outside the model is covered: MAML++'s per-step BatchNorm weights
    replace the model's unused ones (the row of the final step); learned inner learning
    rates (Meta-SGD, MAML++) only act in adaptation and do not enter predictions.

    Args:
        learner: the trained meta-learner.
        fast: one task's adapted weights, ``learner.adapt(support_x, support_y)`` for one
            task; ``None`` exports the meta-learned initialisation.
        steps: without ``fast``, for MAML++ with per-step BatchNorm: the BatchNorm row of
            the prediction after this many inner steps (default ``learner.inner_steps``).
            No effect on other learners.

    Returns:
        The model, in eval mode; other modules than BatchNorm are as in ``learner.model``.
        Normalisation the model's own code does with ``F.batch_norm`` (which the learners
        compute with batch statistics) stays as that code says: pass it
        ``running_mean=None, running_var=None`` to predict the same in plain PyTorch.

    Example:
        >>> import torch
        >>> from metalearn import MAML
        >>> from metalearn.export import export
        >>> from metalearn.models import Conv4
        >>> maml = MAML(Conv4(ways=5, hidden=8), inner_lr=0.4, inner_steps=1)
        >>> support, queries = torch.rand(5, 1, 28, 28), torch.rand(10, 1, 28, 28)
        >>> fast = maml.adapt(support, torch.arange(5))
        >>> net = export(maml, fast)
        >>> torch.allclose(net(queries), maml.predict(fast, queries), atol=1e-5)
        True
    """
    if not isinstance(learner, MetaLearner):
        raise TypeError(f"learner must be a metalearn learner (MAML, ...), got "
                        f"{type(learner).__name__}")
    weights = _prediction_weights(learner, fast, steps)
    model = batch_statistics_everywhere(copy.deepcopy(learner.model))
    with torch.no_grad():
        for name, value in weights.items():
            model.get_parameter(name).copy_(value)
    return model.eval()


def export_checkpoint(path: str | os.PathLike, steps: int | None = None) -> nn.Module:
    """:func:`export` of the meta-learned model saved in a training checkpoint (on CPU).

    Rebuilds the learner from the checkpoint's config, with the model and the learned
    state (``ckpt["learner"]``: MAML++'s per-step BatchNorm weights, learned rates), as
    ``metalearn eval`` does. Loading ``ckpt["model"]`` into a plain model instead would
    miss that state, and leave BatchNorm's running buffers at mean 0, variance 1.

    Args:
        path: a checkpoint written by :func:`~metalearn.train` (``.pt`` or ``.best.pt``).
        steps: as for :func:`export`.

    Raises:
        metalearn.checkpoint.CheckpointError: the file is not a usable checkpoint.
    """
    from metalearn.checkpoint import CheckpointError, load_checkpoint
    from metalearn.config import TrainConfig, build_learner, build_model

    state = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict({**state["config"], "device": "cpu"}).resolved()
        model = build_model(cfg)
        model.load_state_dict(state["model"])
        learner = build_learner(cfg, model, evaluation=True)
        learner.learned.load_state_dict(state.get("learner", {}))
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not hold a usable model and learner state: "
                              f"{str(err).splitlines()[0]}") from None
    return export(learner, steps=steps)
