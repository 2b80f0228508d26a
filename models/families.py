"""Built-in model families, each with a ``width`` capacity knob.

Every builder returns an ``nn.Sequential`` made only of walkable modules (see :mod:`lawbench.models.layers`), uses
PyTorch's default initialization (deterministic given ``torch.manual_seed``) and maps inputs in [0, 1] to logits.
"""
from __future__ import annotations

import math
import numbers

from torch import nn

from .layers import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, Normalize, Residual
from .registry import ModelError, register_model

__all__ = ["mlp", "mlp_deep", "cnn", "wrn16", "wrn_block"]

_VECTOR_DATASETS = ("mnist5k", "mnist", "digits", "gauss", "cifar10")


def _in_dim(in_shape) -> int:
    return int(math.prod(in_shape))


@register_model(
    "mlp", family="mlp", default_widths=(10, 40, 160, 640, 2560, 5120), inputs="any", datasets=_VECTOR_DATASETS,
    description="two-layer ReLU network (one hidden layer of `width` units): the setting of the two-layer law")
def mlp(in_shape, num_classes, width):
    """Flatten, Linear(d, width), ReLU, Linear(width, C); p = d*w + w + w*C + C."""
    d = _in_dim(in_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


@register_model(
    "mlp-deep", family="mlp-deep", default_widths=(16, 64, 256, 1024, 2048), inputs="any",
    datasets=_VECTOR_DATASETS,
    description="ReLU MLP with `depth` hidden layers (default 3), all of `width` units")
def mlp_deep(in_shape, num_classes, width, depth=3):
    """Flatten, then ``depth`` x (Linear, ReLU) of size ``width``, then Linear(width, C)."""
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise ModelError(f"model 'mlp-deep': depth must be a positive integer, got {depth!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = _in_dim(in_shape)
    for _ in range(int(depth)):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


@register_model(
    "cnn", family="cnn", default_widths=(1, 2, 4, 8, 16), inputs="image",
    datasets=("mnist5k", "mnist", "digits", "cifar10"),
    description="Madry et al. MNIST CNN at capacity scale s=width (conv 2s, conv 4s, fc 64s); s=16 is the original")
def cnn(in_shape, num_classes, width):
    """conv5x5(2s, pad 2), ReLU, maxpool2, conv5x5(4s, pad 2), ReLU, maxpool2, Flatten, Linear(., 64s), ReLU,
    Linear(64s, C)."""
    c, h, w = in_shape
    h2, w2 = (h // 2) // 2, (w // 2) // 2
    if h2 < 1 or w2 < 1:
        raise ModelError(f"model 'cnn' needs images of at least 4x4 (two 2x2 max-pools), got in_shape {tuple(in_shape)}")
    s = width
    return nn.Sequential(
        nn.Conv2d(c, 2 * s, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * s, 4 * s, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * s * h2 * w2, 64 * s),
        nn.ReLU(),
        nn.Linear(64 * s, num_classes),
    )


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def wrn_block(cin: int, cout: int, stride: int) -> nn.Module:
    """Pre-activation WideResNet basic block in walkable form.

    Non-projecting (cin == cout, stride 1): Residual(Seq(BN, ReLU, conv3x3, BN, ReLU, conv3x3), Identity).
    Projecting: Seq(BN, ReLU, Residual(Seq(conv3x3(stride), BN, ReLU, conv3x3), conv1x1(stride))) -- the shortcut
    sees the activated input, exactly as in the original WRN code.
    """
    if cin == cout and stride == 1:
        branch = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), _conv3x3(cin, cout),
            nn.BatchNorm2d(cout), nn.ReLU(), _conv3x3(cout, cout),
        )
        return Residual(branch, nn.Identity())
    branch = nn.Sequential(_conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(), _conv3x3(cout, cout))
    shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), Residual(branch, shortcut))


@register_model(
    "wrn16", family="wrn", default_widths=(1, 2, 4, 8, 10), inputs="image", datasets=("cifar10",),
    description="WideResNet-16-k (k=width), pre-activation, channels 16k/32k/64k; CIFAR normalization inside")
def wrn16(in_shape, num_classes, width, normalize=None):
    """WRN-16-k: conv3x3(16), 3 groups x 2 blocks (16k, 32k s2, 64k s2), BN, ReLU, global avg pool, Linear.

    ``normalize``: None (default) puts the standard CIFAR-10 mean/std in the leading Normalize layer when the input has
    3 channels (identity otherwise); True forces it (MNIST statistics for 1 channel); False keeps the identity.
    """
    c = in_shape[0]
    if normalize is None:
        normalize = c == 3
    if normalize:
        if c == 3:
            norm = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        elif c == 1:
            norm = Normalize(MNIST_MEAN, MNIST_STD)
        else:
            raise ModelError(f"model 'wrn16': no standard normalization for {c}-channel input; use normalize=False")
    else:
        norm = Normalize()
    k = width
    widths = (16 * k, 32 * k, 64 * k)
    layers: list[nn.Module] = [norm, _conv3x3(c, 16)]
    cin = 16
    for g, cout in enumerate(widths):
        stride = 1 if g == 0 else 2
        layers.append(nn.Sequential(wrn_block(cin, cout, stride), wrn_block(cout, cout, 1)))
        cin = cout
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
