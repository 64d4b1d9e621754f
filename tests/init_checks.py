"""Shared assertions about initial weights (tests of the official init of each model)."""
import pytest


def assert_pytorch_default_conv_init(convs):
    """Every conv keeps PyTorch's default init: kaiming-uniform a=sqrt(5) (std 1/sqrt(3 fan_in),
    |w| <= 1/sqrt(fan_in)) and non-zero biases uniform in +-1/sqrt(fan_in)."""
    for conv in convs:
        fan_in = conv.weight[0].numel()
        bound = fan_in ** -0.5
        assert float(conv.weight.detach().std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)
        assert float(conv.weight.detach().abs().max()) <= bound
        assert bool((conv.bias.detach() != 0).all()) and float(conv.bias.detach().abs().max()) <= bound
        assert float(conv.bias.detach().std()) > 0.3 * bound / 3 ** 0.5
