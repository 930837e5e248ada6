"""The FLOP count of benchmarks/time_breakdown.py against torch.utils.flop_counter."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.time_breakdown import KernelTimer


def _counted(fn) -> tuple[int, int]:
    """(KernelTimer's convolution FLOPs, FlopCounterMode's total) of ``fn()``."""
    timer = KernelTimer()
    with timer:
        fn()
    with FlopCounterMode(display=False) as counter:
        fn()
    return timer.conv_flops, counter.get_total_flops()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("transposed", [False, True])
def test_plain_convolution_forward_and_backward_match_flop_counter(stride, transposed):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 9, requires_grad=True)
    w = torch.randn(4, 6, 3, 3, requires_grad=True) if transposed else torch.randn(
        6, 4, 3, 3, requires_grad=True)
    conv = F.conv_transpose2d if transposed else F.conv2d

    def forward_backward():
        conv(x, w, stride=stride, padding=1).square().sum().backward()

    ours, reference = _counted(forward_backward)
    # flop_counter counts the square's and sum's backward as 0, like the timer.
    assert ours == reference > 0


def test_masked_backward_counts_only_the_gradients_computed():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 9)  # no input gradient: the mask leaves it out
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    forward, _ = _counted(lambda: F.conv2d(x, w, padding=1))
    both, _ = _counted(lambda: F.conv2d(x, w, padding=1).sum().backward())
    assert both == 2 * forward


def test_grouped_convolution_is_the_sum_of_its_groups():
    torch.manual_seed(0)
    groups = 5
    x = torch.randn(2, groups * 3, 8, 8, requires_grad=True)
    w = torch.randn(groups * 4, 3, 3, 3, requires_grad=True)

    def grouped():
        F.conv2d(x, w, stride=2, padding=1, groups=groups).sum().backward()

    def group(i):
        xi = x.detach()[:, 3 * i:3 * i + 3].requires_grad_()
        wi = w.detach()[4 * i:4 * i + 4].requires_grad_()
        return lambda: F.conv2d(xi, wi, stride=2, padding=1).sum().backward()

    ours, counter = _counted(grouped)
    per_group = sum(_counted(group(i))[1] for i in range(groups))
    assert ours == per_group > 0
    # torch 2.13's flop_counter gets the grouped backward wrong: why the benchmark counts.
    assert counter != per_group


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_onednn_split_sees_the_convolution_and_leaves_stdout_working(capfd):
    from benchmarks.time_breakdown import onednn_milliseconds

    x, w = torch.randn(4, 16, 12, 12), torch.randn(16, 16, 3, 3)
    totals = onednn_milliseconds(lambda: F.conv2d(x, w, padding=1))
    assert totals.get("convolution", 0) > 0
    print("still here")
    assert "still here" in capfd.readouterr().out
