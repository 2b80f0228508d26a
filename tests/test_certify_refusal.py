"""certify refuses what it cannot verify exactly: every module is an exact supported class (or a subclass that
redefines nothing), with no hooks and no replaced methods; anything else is a CertifyError naming the module's path.

Each refused model of issue 8 is also *measured*: a verified secant of the model as it really runs exceeds, by a wide
margin, the bound the walk used to give it (the bound of the same model with the override / hook / wrong class
removed, or 0 for the per-sample standardisation), so each refusal prevents a false certificate."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lawbench import models
from lawbench.certify import CertifyError, certified_accuracy, certified_radii, lipschitz_upper, supported_layers
from lawbench.certify._linalg import lapack_threads
from lawbench.models.layers import Normalize, Residual


@pytest.fixture(autouse=True)
def _one_thread():
    with lapack_threads(1):
        yield


def measured(model: nn.Module, x: torch.Tensor, t: float = 1e-4) -> float:
    """Largest secant ||f(a) - f(b)|| / ||a - b|| along each point's top Jacobian direction (float64): a certain
    lower bound on the true Lipschitz constant of the model exactly as it runs (overrides and hooks included)."""
    m = copy.deepcopy(model).double().eval()
    best = 0.0
    for xi in x.double():
        J = torch.autograd.functional.jacobian(lambda z: m(z[None])[0], xi).reshape(-1, xi.numel())
        v = torch.linalg.svd(J).Vh[0].reshape(xi.shape)
        a, b = xi - t * v, xi + t * v
        with torch.no_grad():
            best = max(best, float((m(a[None]) - m(b[None])).norm() / (a - b).norm()))
    return best


def refused(model: nn.Module, in_shape, pattern: str) -> None:
    with pytest.raises(CertifyError, match=pattern) as info:
        lipschitz_upper(model, in_shape)
    assert "\n" not in str(info.value)


def twin(model: nn.Module, honest: nn.Module) -> nn.Module:
    """`honest` with `model`'s weights: what the old walk actually bounded."""
    honest.load_state_dict(model.state_dict())
    return honest


# ------------------------------------------------------------------------------ the seven rows of issue 8

class Standardize(nn.Module):
    """Per-sample standardisation, with mean/std buffers that made the old walk take it for a Normalize."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("std", torch.ones(1))

    def forward(self, x):
        return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-3)


class UnitNormalize(nn.Module):
    """F.normalize, not a per-channel affine map."""

    def forward(self, x):
        return F.normalize(x, dim=1)


UnitNormalize.__name__ = UnitNormalize.__qualname__ = "Normalize"      # the name the old walk matched on


class TenReLU(nn.ReLU):
    def forward(self, x):
        return 10 * F.relu(x)


class TenLinear(nn.Linear):
    def forward(self, x):
        return 10 * super().forward(x)


class TenSequential(nn.Sequential):
    def forward(self, x):
        return 10 * super().forward(x)


class DuckResidual(nn.Module):
    """Has branch/shortcut like the suite's Residual, computes 10 * branch + shortcut."""

    def __init__(self, branch, shortcut, scale=10.0):
        super().__init__()
        self.branch, self.shortcut, self.scale = branch, shortcut, scale

    def forward(self, x):
        return self.scale * self.branch(x) + self.shortcut(x)


def mlp(mid: nn.Module | None = None, last: nn.Module | None = None):
    return nn.Sequential(nn.Linear(6, 8), mid if mid is not None else nn.ReLU(),
                         last if last is not None else nn.Linear(8, 3))


def test_per_sample_standardisation_with_mean_std_buffers_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(Standardize(), nn.Linear(6, 3))
    refused(model, (6,), r"^certify: model\.0 \(Standardize\) unsupported layer type "
                         r"test_certify_refusal\.Standardize; supported: .*models\.layers\.Normalize")
    x = 0.5 + 0.01 * torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    assert measured(model, x) > 10.0                    # the old walk's diag m(1) - m(0) = 0 certified 0.0


def test_a_user_class_named_normalize_is_not_the_suites_normalize():
    torch.manual_seed(1)
    model = nn.Sequential(UnitNormalize(), nn.Linear(6, 3))
    refused(model, (6,), r"^certify: model\.0 \(Normalize\) unsupported layer type test_certify_refusal\.Normalize;")
    old = lipschitz_upper(nn.Sequential(Normalize(0.0, math.sqrt(6)), model[1]), (6,)).value
    x = 0.01 * torch.rand(16, 6, generator=torch.Generator().manual_seed(1))
    assert measured(model, x) > 10 * old                # old: diag F.normalize(1) = 1/sqrt(6)


@pytest.mark.parametrize("case", ["relu-subclass", "linear-subclass", "sequential-subclass", "forward-hook",
                                  "duck-residual"])
def test_overrides_hooks_and_duck_residuals_are_refused_and_the_refusal_matters(case):
    torch.manual_seed(2)
    x = torch.rand(16, 6, generator=torch.Generator().manual_seed(2))
    if case == "relu-subclass":
        model, honest = mlp(mid=TenReLU()), mlp()
        pattern = r"^certify: model\.1 \(TenReLU, subclass of ReLU\) overrides forward; refusing to bound it$"
        factor = 4
    elif case == "linear-subclass":
        model, honest = mlp(last=TenLinear(8, 3)), mlp()
        pattern, factor = r"^certify: model\.2 \(TenLinear, subclass of Linear\) overrides forward; refusing", 3
    elif case == "sequential-subclass":
        model, honest = nn.Sequential(nn.Identity(), TenSequential(*mlp())), nn.Sequential(nn.Identity(), mlp())
        pattern, factor = r"^certify: model\.1 \(TenSequential, subclass of Sequential\) overrides forward;", 4
    elif case == "forward-hook":
        model, honest = mlp(), mlp()
        model[2].register_forward_hook(lambda mod, inp, out: 10 * out)
        pattern, factor = r"^certify: model\.2 \(Linear\) has a forward hook; refusing to bound it$", 4
    else:
        model = nn.Sequential(DuckResidual(nn.Linear(6, 6), nn.Identity()), nn.ReLU(), nn.Linear(6, 3))
        honest = nn.Sequential(Residual(nn.Linear(6, 6), nn.Identity()), nn.ReLU(), nn.Linear(6, 3))
        with torch.no_grad():
            model[0].branch.weight.mul_(3.0)
        pattern, factor = r"^certify: model\.0 \(DuckResidual\) unsupported layer type .*DuckResidual;", 3
    refused(model, (6,), pattern)
    old = lipschitz_upper(twin(model, honest), (6,)).value          # what the old walk certified
    assert measured(model, x) > factor * old


# ------------------------------------------------------------------------------ what is still accepted

class TaggedSequential(nn.Sequential):
    def __init__(self, *layers, tag="block"):
        super().__init__(*layers)
        self.tag = tag


class DescribedLinear(nn.Linear):
    def describe(self) -> str:                          # a new method forward never calls
        return f"{self.in_features}->{self.out_features}"


def test_subclass_without_overrides_is_accepted_and_bounded_like_its_parent():
    torch.manual_seed(3)
    model = TaggedSequential(DescribedLinear(6, 8), nn.ReLU(), nn.Linear(8, 3), tag="t")
    parent = twin(model, mlp())
    ub, ref = lipschitz_upper(model, (6,)), lipschitz_upper(parent, (6,))
    assert ub.value == ref.value and ub.linf == ref.linf
    assert torch.equal(ub.pair, ref.pair)


def test_the_suites_normalize_and_residual_are_accepted():
    torch.manual_seed(4)
    model = nn.Sequential(Normalize([0.5, 0.4], [0.25, 0.5]), nn.Conv2d(2, 3, 3, padding=1),
                          Residual(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))),
                          nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    ub = lipschitz_upper(model, (2, 5, 5))
    x = torch.rand(8, 2, 5, 5, generator=torch.Generator().manual_seed(4))
    assert 0 < measured(model, x) <= ub.value


@pytest.mark.parametrize("name,in_shape,width", [("mlp", (1, 8, 8), 16), ("mlp-deep", (12,), 8),
                                                 ("cnn", (1, 12, 12), 1), ("wrn16", (3, 8, 8), 1)])
def test_built_in_families_still_certify(name, in_shape, width):
    torch.manual_seed(5)
    model = models.get_model(name, in_shape=in_shape, num_classes=10, width=width)
    ub = lipschitz_upper(model, in_shape)
    assert math.isfinite(ub.value) and ub.value > 0 and ub.in_shape == in_shape


def test_a_module_used_twice_in_a_sequential_is_bounded_twice():
    """named_children() lists a shared module once; the forward runs it twice."""
    torch.manual_seed(6)
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.copy_(3 * torch.eye(4) + 0.1 * torch.randn(4, 4))
    model = nn.Sequential(lin, lin)
    ub = lipschitz_upper(model, (4,))
    assert measured(model, torch.rand(4, 4)) <= ub.value
    assert ub.value > 8.0                               # about ||W||^2 = 9, not ||W|| = 3


# ------------------------------------------------------------------------------ more refusals

class CallOverride(nn.ReLU):
    def __call__(self, x):
        return 10 * super().__call__(x)


class CallImplOverride(nn.ReLU):
    def _call_impl(self, *args, **kwargs):
        return 10 * super()._call_impl(*args, **kwargs)


class ConvHelperOverride(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):             # Conv2d.forward delegates here
        return super()._conv_forward(x, 10 * weight, bias)


class ReversedSequential(nn.Sequential):
    def __iter__(self):                                   # Sequential.forward iterates self
        return reversed(list(self._modules.values()))


class PropertyOverride(nn.Linear):
    @property
    def scale(self):                                      # a property could hide a parameter the forward reads
        return 10


class ScaleMixin:
    def forward(self, x):
        return 10 * x


class MixinFirst(ScaleMixin, nn.Identity):
    pass


@pytest.mark.parametrize("make,pattern", [
    (lambda: nn.Sequential(nn.Linear(6, 6), CallOverride()), r"model\.1 \(CallOverride, subclass of ReLU\) "
                                                             r"overrides __call__;"),
    (lambda: nn.Sequential(nn.Linear(6, 6), CallImplOverride()), r"model\.1 \(CallImplOverride, subclass of ReLU\) "
                                                                 r"overrides _call_impl;"),
    (lambda: nn.Sequential(nn.Unflatten(1, (1, 2, 3)), ConvHelperOverride(1, 1, 1)),
     r"model\.1 \(ConvHelperOverride, subclass of Conv2d\) overrides _conv_forward;"),
    (lambda: ReversedSequential(nn.Linear(6, 6)), r"^certify: model \(ReversedSequential, subclass of Sequential\) "
                                                  r"overrides __iter__;"),
    (lambda: nn.Sequential(PropertyOverride(6, 2)), r"model\.0 \(PropertyOverride, subclass of Linear\) "
                                                    r"overrides scale;"),
    (lambda: nn.Sequential(MixinFirst()), r"model\.0 \(MixinFirst, subclass of Identity\) overrides forward;"),
    (lambda: nn.Sequential(nn.Linear(6, 6), DuckResidual(nn.Linear(6, 6), nn.Identity(), scale=1.0)),
     r"model\.1 \(DuckResidual\) unsupported layer type"),
])
def test_overrides_of_anything_the_forward_reaches_are_refused(make, pattern):
    refused(make(), (6,), pattern)


def test_a_method_replaced_on_the_instance_is_refused():
    model = mlp()
    model[1].forward = lambda x: 10 * F.relu(x)
    refused(model, (6,), r"^certify: model\.1 \(ReLU\) has forward replaced on the instance; refusing to bound it$")


def test_hooks_are_refused_module_level_and_global():
    inner = nn.Sequential(nn.Linear(6, 6))
    model = nn.Sequential(nn.ReLU(), Residual(inner), nn.Linear(6, 2))
    handle = inner[0].register_forward_pre_hook(lambda mod, args: (10 * args[0],))
    refused(model, (6,), r"^certify: model\.1\.branch\.0 \(Linear\) has a forward-pre hook; refusing to bound it$")
    handle.remove()
    handle = model[1].register_forward_hook(lambda mod, inp, out: 10 * out, with_kwargs=False)
    refused(model, (6,), r"^certify: model\.1 \(Residual\) has a forward hook;")
    handle.remove()
    assert lipschitz_upper(model, (6,)).value > 0
    glob = torch.nn.modules.module
    for register, kind in ((glob.register_module_forward_hook, "forward"),
                           (glob.register_module_forward_pre_hook, "forward-pre")):
        handle = register(lambda *a: None)
        try:
            refused(model, (6,), rf"^certify: model \(Sequential\) has a global {kind} hook \(torch\.nn\.modules\."
                                 rf"module\.register_module_forward(_pre)?_hook\); refusing to bound it$")
        finally:
            handle.remove()
    assert lipschitz_upper(model, (6,)).value > 0


def test_residual_branches_that_broadcast_are_refused():
    """x + mean(x) broadcast: the branch's value counts 6 times, not once as in ||branch|| + ||shortcut||."""
    model = nn.Sequential(nn.Unflatten(1, (1, 2, 3)), Residual(nn.AdaptiveAvgPool2d(1)), nn.Flatten(),
                          nn.Linear(6, 2))
    with torch.no_grad():
        model[3].weight.copy_(torch.tensor([[1.0] * 6, [0.0] * 6]))
    refused(model, (6,), r"^certify: model\.1 \(Residual\) adds a branch of shape \(1, 1, 1\) to a shortcut of "
                         r"shape \(1, 2, 3\)")
    old = math.sqrt(6) * (1 / math.sqrt(6) + 1)         # ||W|| (||avgpool|| + ||identity||), the old walk's bound
    assert measured(model, torch.rand(4, 6)) > 1.3 * old


def test_the_refusal_lists_the_supported_table():
    msg = ""
    try:
        lipschitz_upper(nn.Sequential(nn.GELU()), (3,))
    except CertifyError as e:
        msg = str(e)
    assert msg.endswith("supported: " + ", ".join(supported_layers()))
    assert {"nn.Sequential", "nn.Linear", "nn.Conv2d", "lawbench.models.layers.Normalize",
            "lawbench.models.layers.Residual"} <= set(supported_layers())


# ------------------------------------------------------------------------------ the bound must fit the data

def test_certification_refuses_data_of_another_shape_or_class_count():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(8, 3))
    ub = lipschitz_upper(model, (1, 6, 6))
    assert ub.in_shape == (1, 6, 6) and ub.to_dict()["in_shape"] == [1, 6, 6]
    x, y = torch.rand(5, 1, 9, 9), torch.zeros(5, dtype=torch.long)       # the model runs on 9x9 just as well
    pattern = r"^certify: the bound was computed for inputs of shape \(1, 6, 6\), but x has shape \(1, 9, 9\)"
    with pytest.raises(CertifyError, match=pattern):
        certified_accuracy(model, x, y, ub, [0.1], "L2")
    with pytest.raises(CertifyError, match=pattern):
        certified_radii(model, x, y, ub, "Linf")
    assert set(certified_accuracy(model, x[:, :, :6, :6], y, ub, [0.1], "L2")) == {0.1}
    other = nn.Sequential(*list(model)[:-1], nn.Linear(8, 4))
    with pytest.raises(CertifyError, match=r"computed for 3 classes, but the model returns 4 logits"):
        certified_radii(other, x[:, :, :6, :6], y, ub, "L2")
