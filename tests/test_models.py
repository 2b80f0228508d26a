"""Tests for the models package: registry, families, parameter counts, plugins, entry points, checkpoints."""
from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import textwrap
import urllib.request

from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from lawbench import models
from lawbench.models import (ModelError, check_structure, count_params, get_entry, get_model, list_models,
                             load_checkpoint, load_entry_points, load_plugin, param_count, read_checkpoint_entry,
                             register_model, save_checkpoint)
from lawbench.models import registry as _registry
from lawbench.models.layers import Normalize, Residual


@pytest.fixture(autouse=True)
def _restore_registry():
    saved = dict(_registry._REGISTRY)
    saved_eps = set(_registry._LOADED_EPS)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)
    _registry._LOADED_EPS.clear()
    _registry._LOADED_EPS.update(saved_eps)


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------- registry

def test_builtin_entries_registered():
    names = [e.name for e in list_models()]
    for n in ("mlp", "mlp-deep", "cnn", "wrn16"):
        assert n in names
    assert names == sorted(names)
    assert [e.name for e in list_models("mlp*")] == ["mlp", "mlp-deep"]
    assert [e.name for e in list_models("wrn?6")] == ["wrn16"]
    assert list_models("nothing-*") == []
    assert get_entry("cnn").inputs == "image" and get_entry("mlp").inputs == "any"
    assert get_entry("wrn16").datasets == ("cifar10",)


def test_mlp_default_widths_span_the_law_regime():
    n, d = 4000, 784  # MNIST-5k training split
    ratios = [param_count("mlp", in_shape=(1, 28, 28), num_classes=10, width=w) / (n * d)
              for w in get_entry("mlp").default_widths]
    assert min(ratios) <= 0.01 and max(ratios) > 1
    assert ratios == sorted(ratios)


def test_register_duplicate_and_list():
    @register_model("toy-test", family="toy", default_widths=(2, 4), description="a toy")
    def toy(in_shape, num_classes, width):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))

    e = get_entry("toy-test")
    assert (e.family, e.default_widths, e.inputs, e.description, e.fn) == ("toy", (2, 4), "any", "a toy", toy)
    assert [x.name for x in list_models("toy-*")] == ["toy-test"]
    assert get_model("toy-test", in_shape=(5,), num_classes=3, width=1)(torch.rand(4, 5)).shape == (4, 3)

    with pytest.raises(ModelError, match="'toy-test' is already registered"):
        @register_model("toy-test")
        def toy2(in_shape, num_classes, width):  # pragma: no cover - never called
            raise AssertionError

    assert get_entry("toy-test").fn is toy  # the first registration survives
    models.unregister_model("toy-test")
    assert list_models("toy-*") == []


def test_register_rejects_bad_declarations():
    with pytest.raises(ModelError, match="inputs"):
        register_model("bad-inputs", inputs="images")
    with pytest.raises(ModelError, match="default_widths.*-3"):
        register_model("bad-widths", default_widths=(4, -3))
    with pytest.raises(ModelError, match="name"):
        register_model("")


def test_unknown_name_lists_close_matches():
    with pytest.raises(ModelError) as ei:
        get_model("mpl", in_shape=(784,), num_classes=10, width=8)
    msg = _one_line(ei.value)
    assert "'mpl'" in msg and "did you mean 'mlp'" in msg
    with pytest.raises(ModelError, match="wrn16"):
        get_entry("wrn-16")


@pytest.mark.parametrize("width", [0, -4, 2.5, "8", True, None])
def test_bad_width_is_named(width):
    with pytest.raises(ModelError) as ei:
        get_model("mlp", in_shape=(784,), num_classes=10, width=width)
    assert repr(width) in _one_line(ei.value) and "width" in str(ei.value)


def test_bad_shape_num_classes_and_options():
    with pytest.raises(ModelError, match=r"in_shape"):
        get_model("mlp", in_shape=(28, 28), num_classes=10, width=4)
    with pytest.raises(ModelError, match=r"in_shape"):
        get_model("mlp", in_shape=(1, 0, 28), num_classes=10, width=4)
    with pytest.raises(ModelError, match="num_classes"):
        get_model("mlp", in_shape=(784,), num_classes=0, width=4)
    with pytest.raises(ModelError, match="no option 'depth'"):
        get_model("mlp", in_shape=(784,), num_classes=10, width=4, depth=2)
    with pytest.raises(ModelError, match="depth"):
        get_model("mlp-deep", in_shape=(784,), num_classes=10, width=4, depth=0)
    with pytest.raises(ModelError, match="at least 4x4"):
        get_model("cnn", in_shape=(1, 3, 3), num_classes=10, width=1)


@pytest.mark.parametrize("name", ["cnn", "wrn16"])
def test_image_family_on_vector_input_errors(name):
    with pytest.raises(ModelError) as ei:
        get_model(name, in_shape=(784,), num_classes=10, width=1)
    msg = _one_line(ei.value)
    assert f"'{name}'" in msg and "(784,)" in msg


def test_broken_builder_reported_in_one_line():
    @register_model("broken-test")
    def broken(in_shape, num_classes, width):
        raise RuntimeError("boom\nsecond line")

    @register_model("not-a-module-test")
    def not_module(in_shape, num_classes, width):
        return 42

    with pytest.raises(ModelError, match="'broken-test' failed to build.*RuntimeError: boom second line"):
        get_model("broken-test", in_shape=(3,), num_classes=2, width=1)
    with pytest.raises(ModelError, match="not an nn.Module"):
        get_model("not-a-module-test", in_shape=(3,), num_classes=2, width=1)


# ---------------------------------------------------------------------------------------------- counting

def test_count_params_trainable_only():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm2d(5), nn.Linear(4, 2))
    assert count_params(m) == (12 + 4) + (5 + 5) + (8 + 2)  # BN running stats are buffers, not counted
    m[0].weight.requires_grad_(False)
    assert count_params(m) == 4 + 10 + 10
    shared = nn.Linear(3, 3)
    assert count_params(nn.Sequential(shared, shared)) == 12  # shared parameters counted once


@pytest.mark.parametrize("in_shape,w,c", [((784,), 10, 10), ((1, 28, 28), 640, 10), ((3, 32, 32), 7, 3),
                                          ((64,), 1, 2)])
def test_mlp_param_count_formula(in_shape, w, c):
    d = math.prod(in_shape)
    m = get_model("mlp", in_shape=in_shape, num_classes=c, width=w)
    assert count_params(m) == d * w + w + w * c + c
    assert param_count("mlp", in_shape=in_shape, num_classes=c, width=w) == d * w + w + w * c + c


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_mlp_deep_param_count_formula(depth):
    d, w, c = 64, 12, 10
    m = get_model("mlp-deep", in_shape=(1, 8, 8), num_classes=c, width=w, depth=depth)
    assert count_params(m) == (d * w + w) + (depth - 1) * (w * w + w) + (w * c + c)
    assert sum(isinstance(x, nn.Linear) for x in m) == depth + 1
    assert get_model("mlp-deep", in_shape=(64,), num_classes=c, width=w).__len__() == 1 + 2 * 3 + 1


def _cnn_params(c_in, h, w, s, classes):
    conv1 = 25 * c_in * 2 * s + 2 * s
    conv2 = 25 * 2 * s * 4 * s + 4 * s
    fc1 = 4 * s * (h // 4) * (w // 4) * 64 * s + 64 * s
    return conv1 + conv2 + fc1 + 64 * s * classes + classes


def test_cnn_param_count():
    # s = 2 on MNIST by hand: conv1 25*1*4+4, conv2 25*4*8+8, fc 8*7*7*128+128, out 128*10+10
    assert count_params(get_model("cnn", in_shape=(1, 28, 28), num_classes=10, width=2)) == 104 + 808 + 50304 + 1290
    # s = 16 is Madry et al.'s 32/64/1024 MNIST network
    madry = get_model("cnn", in_shape=(1, 28, 28), num_classes=10, width=16)
    assert [m.out_channels for m in madry if isinstance(m, nn.Conv2d)] == [32, 64]
    assert madry[7].out_features == 1024
    assert count_params(madry) == 3_274_634 == _cnn_params(1, 28, 28, 16, 10)
    for shape in [(1, 8, 8), (3, 32, 32)]:
        assert count_params(get_model("cnn", in_shape=shape, num_classes=10, width=3)) == _cnn_params(*shape, 3, 10)


def _wrn16_params(c_in, k, classes):
    bn = lambda ch: 2 * ch  # noqa: E731
    conv3 = lambda a, b: 9 * a * b  # noqa: E731
    total = conv3(c_in, 16)
    cin = 16
    for cout in (16 * k, 32 * k, 64 * k):
        # first block (projecting unless channels match at stride 1), second block never projects
        total += bn(cin) + conv3(cin, cout) + bn(cout) + conv3(cout, cout)
        if cin != cout or cout != 16 * k:
            total += cin * cout  # 1x1 shortcut conv, no bias
        total += 2 * bn(cout) + 2 * conv3(cout, cout)
        cin = cout
    return total + bn(cin) + cin * classes + classes


def test_wrn16_param_count():
    # k = 1, CIFAR, by hand: stem 432, group1 2*(64+4608), group2 14432+18560, group3 57536+73984, BN 128, fc 650
    assert count_params(get_model("wrn16", in_shape=(3, 32, 32), num_classes=10, width=1)) == 175_066
    for k in (1, 2, 3):
        assert count_params(get_model("wrn16", in_shape=(3, 32, 32), num_classes=10, width=k)) \
            == _wrn16_params(3, k, 10)
    assert param_count("wrn16", in_shape=(1, 28, 28), num_classes=7, width=2) == _wrn16_params(1, 2, 7)
    # WRN-16-8 has 11.0M parameters (Zagoruyko & Komodakis 2016, table 1); counted on the meta device
    assert param_count("wrn16", in_shape=(3, 32, 32), num_classes=10, width=8) == _wrn16_params(3, 8, 10)
    assert round(param_count("wrn16", in_shape=(3, 32, 32), num_classes=10, width=8) / 1e6, 1) == 11.0


# ---------------------------------------------------------------------------------------------- families

SHAPES = {
    "mlp": [(784,), (1, 28, 28), (64,), (1, 8, 8), (3, 32, 32)],
    "mlp-deep": [(784,), (1, 28, 28), (64,), (1, 8, 8), (3, 32, 32)],
    "cnn": [(1, 28, 28), (1, 8, 8), (3, 32, 32)],
    "wrn16": [(3, 32, 32), (1, 28, 28), (1, 8, 8)],
}


@pytest.mark.parametrize("name,in_shape", [(n, s) for n, shapes in SHAPES.items() for s in shapes])
def test_forward_shape_and_structure(name, in_shape):
    torch.manual_seed(0)
    m = get_model(name, in_shape=in_shape, num_classes=7, width=2)
    assert type(m) is nn.Sequential and check_structure(m) == []
    x = torch.rand(3, *in_shape)
    out = m(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.sum().backward()  # differentiable end to end (attacks need input gradients)
    assert count_params(m) == param_count(name, in_shape=in_shape, num_classes=7, width=2)


@pytest.mark.parametrize("name", list(SHAPES))
def test_deterministic_given_seed(name):
    shape = SHAPES[name][0]
    torch.manual_seed(123)
    a = get_model(name, in_shape=shape, num_classes=10, width=1).state_dict()
    torch.manual_seed(123)
    b = get_model(name, in_shape=shape, num_classes=10, width=1).state_dict()
    torch.manual_seed(124)
    c = get_model(name, in_shape=shape, num_classes=10, width=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_wrn16_block_structure_and_normalization():
    m = get_model("wrn16", in_shape=(3, 32, 32), num_classes=10, width=2)
    assert isinstance(m[0], Normalize) and not m[0].is_identity
    assert torch.allclose(m[0].mean, torch.tensor([0.4914, 0.4822, 0.4465]))
    g1, g2, g3 = m[2], m[3], m[4]
    # projecting block: Seq(BN, ReLU, Residual(Seq(conv s, BN, ReLU, conv), conv1x1 s))
    proj = g2[0]
    assert [type(x) for x in proj] == [nn.BatchNorm2d, nn.ReLU, Residual]
    assert proj[2].shortcut.kernel_size == (1, 1) and proj[2].shortcut.stride == (2, 2)
    assert proj[2].branch[0].stride == (2, 2)
    # non-projecting block: Residual(Seq(BN, ReLU, conv, BN, ReLU, conv), Identity)
    plain = g3[1]
    assert isinstance(plain, Residual) and isinstance(plain.shortcut, nn.Identity)
    assert [type(x) for x in plain.branch] == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d] * 2
    assert isinstance(g1[0], nn.Sequential)  # 16 -> 32 channels at k=2: projects with stride 1
    assert g1[0][2].shortcut.stride == (1, 1)
    assert isinstance(get_model("wrn16", in_shape=(3, 32, 32), num_classes=10, width=1)[2][0], Residual)
    # normalize, stem, three groups, then the head: BN, ReLU, global average pool, flatten, linear on 64k channels
    assert [type(x) for x in m] == [Normalize, nn.Conv2d] + [nn.Sequential] * 3 + \
        [nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    assert m[-3].output_size in (1, (1, 1)) and (m[-1].in_features, m[-1].out_features) == (64 * 2, 10)
    assert get_model("wrn16", in_shape=(3, 32, 32), num_classes=10, width=1, normalize=False)[0].is_identity
    assert get_model("wrn16", in_shape=(1, 28, 28), num_classes=10, width=1)[0].is_identity
    with pytest.raises(ModelError, match="normalization"):
        get_model("wrn16", in_shape=(2, 8, 8), num_classes=10, width=1, normalize=True)


class _RefBlock(nn.Module):
    """The original WideResNet BasicBlock (Zagoruyko & Komodakis reference PyTorch code, dropout 0)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        self.short = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = F.relu(self.bn1(x))
            out = x
        else:
            out = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return (x if self.equal else self.short(x)) + out


def test_wrn16_matches_reference_computation():
    torch.manual_seed(0)
    k = 2
    ref = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        _RefBlock(16, 16 * k, 1), _RefBlock(16 * k, 16 * k, 1),
        _RefBlock(16 * k, 32 * k, 2), _RefBlock(32 * k, 32 * k, 1),
        _RefBlock(32 * k, 64 * k, 2), _RefBlock(64 * k, 64 * k, 1),
        nn.BatchNorm2d(64 * k), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64 * k, 10))
    ours = get_model("wrn16", in_shape=(3, 32, 32), num_classes=10, width=k, normalize=False)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    our_keys = [key for key in ours_sd if not key.startswith("0.")]  # skip the Normalize buffers
    assert [ours_sd[key].shape for key in our_keys] == [v.shape for v in ref_sd.values()]
    with torch.no_grad():  # random BN statistics so that BN is not close to identity
        for v in ref_sd.values():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) * 0.5 + 0.5 if v.dim() == 1 else v)
    ours.load_state_dict({**{key: ours_sd[key] for key in ours_sd if key.startswith("0.")},
                          **dict(zip(our_keys, ref_sd.values()))})
    ref.eval(), ours.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_normalize_and_residual_layers():
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(Normalize()(x), x) and Normalize().is_identity
    n = Normalize((0.5, 0.25, 0.0), (0.5, 2.0, 1.0))
    y = n(x)
    assert torch.allclose(y[:, 0], (x[:, 0] - 0.5) / 0.5) and torch.allclose(y[:, 1], (x[:, 1] - 0.25) / 2.0)
    assert torch.allclose(Normalize(0.5, 0.25)(torch.ones(2, 5)), torch.full((2, 5), 2.0))
    assert {k for k, _ in n.named_buffers()} == {"mean", "std"} and count_params(n) == 0
    with pytest.raises(ValueError, match="positive"):
        Normalize(0.0, (1.0, 0.0))
    lin = nn.Linear(4, 4)
    r = Residual(lin)
    v = torch.rand(3, 4)
    assert torch.allclose(r(v), lin(v) + v)
    sc = nn.Linear(4, 4, bias=False)
    assert torch.allclose(Residual(lin, sc)(v), lin(v) + sc(v))
    with pytest.raises(TypeError):
        Residual(lambda t: t)
    assert check_structure(nn.Sequential(nn.Linear(2, 2), nn.Tanh())) == ["1: Tanh"]
    assert check_structure(nn.Linear(2, 2))[0].startswith("<top>")


# ----------------------------------------------------------------------------------------------- plugins

def test_load_plugin_from_module(tmp_path, monkeypatch):
    (tmp_path / "lawbench_test_plugin_a.py").write_text(textwrap.dedent("""
        from torch import nn
        from lawbench.models import register_model

        @register_model("plugin-linear", family="linear", default_widths=(1,), description="plugin model")
        def linear(in_shape, num_classes, width, **kw):
            d = 1
            for s in in_shape:
                d *= s
            return nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert load_plugin("lawbench_test_plugin_a") == ["plugin-linear"]
        assert load_plugin("lawbench_test_plugin_a") == []  # already imported: nothing new, no duplicate error
        e = get_entry("plugin-linear")
        assert e.family == "linear" and e.module == "lawbench_test_plugin_a"
        m = get_model("plugin-linear", in_shape=(1, 2, 2), num_classes=3, width=1)
        assert count_params(m) == 4 * 3 + 3
    finally:
        sys.modules.pop("lawbench_test_plugin_a", None)


def test_load_plugin_from_file_path(tmp_path):
    f = tmp_path / "myplugin.py"
    f.write_text("from torch import nn\nfrom lawbench.models import register_model\n"
                 "@register_model('plugin-file')\n"
                 "def m(in_shape, num_classes, width):\n    return nn.Sequential(nn.Flatten())\n")
    assert load_plugin(str(f)) == ["plugin-file"]
    assert load_plugin(str(f)) == []
    sys.modules.pop("_bench_model_plugin_myplugin", None)


def test_load_plugin_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError) as ei:
        load_plugin("lawbench_no_such_module_xyz")
    msg = _one_line(ei.value)
    assert "lawbench_no_such_module_xyz" in msg and "ModuleNotFoundError" in msg
    (tmp_path / "lawbench_test_plugin_bad.py").write_text("import torch\nraise RuntimeError('plugin exploded\\n!')\n")
    (tmp_path / "lawbench_test_plugin_dup.py").write_text(
        "from lawbench.models import register_model\n@register_model('mlp')\n"
        "def f(in_shape, num_classes, width):\n  pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match=r"^cannot load model plugin 'lawbench_test_plugin_bad': RuntimeError: "
                                         r"plugin exploded !$"):
        load_plugin("lawbench_test_plugin_bad")
    with pytest.raises(ModelError, match=r"lawbench_test_plugin_dup.*'mlp' is already registered"):
        load_plugin("lawbench_test_plugin_dup")
    with pytest.raises(ModelError, match="file not found"):
        load_plugin(str(tmp_path / "missing.py"))
    for mod in ("lawbench_test_plugin_bad", "lawbench_test_plugin_dup"):
        sys.modules.pop(mod, None)


def test_plugin_on_the_old_top_level_names_is_told_the_new_one(tmp_path, monkeypatch):
    """`from models import register_model` (before the lawbench namespace) fails with a hint naming the new path.
    The repository root is taken off sys.path first: from there the bare folder would still import."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != root])
    (tmp_path / "lawbench_test_plugin_old.py").write_text("from models import register_model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError) as ei:
        load_plugin("lawbench_test_plugin_old")
    msg = _one_line(ei.value)
    assert "No module named 'models'" in msg and "`from lawbench.models import ...`" in msg, msg


def _fake_distribution(root, name, entry_points: str):
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_load_entry_points(tmp_path, monkeypatch):
    (tmp_path / "lawbench_ep_mod.py").write_text(
        "from torch import nn\nfrom lawbench.models import register_model\n"
        "@register_model('ep-module-model')\n"
        "def m(in_shape, num_classes, width):\n    return nn.Sequential(nn.Flatten())\n")
    (tmp_path / "lawbench_ep_fn.py").write_text(
        "from torch import nn\nfrom lawbench import models\n"
        "def register():\n"
        "    @models.register_model('ep-callable-model', family='epfam', default_widths=(3,))\n"
        "    def m(in_shape, num_classes, width):\n        return nn.Sequential(nn.Flatten())\n")
    _fake_distribution(tmp_path, "lawbench_fake_plugins", textwrap.dedent("""
        [lawbench.models]
        mod = lawbench_ep_mod

        [bench.models]
        fn = lawbench_ep_fn:register

        [console_scripts]
        unrelated = lawbench_ep_fn:register
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        said = []
        assert load_entry_points(deprecated=said.append) == ["ep-module-model", "ep-callable-model"]
        assert get_entry("ep-callable-model").family == "epfam"
        # the old group is still read, and said to be deprecated, once, naming the entry point and both groups
        assert len(said) == 1 and "'fn = lawbench_ep_fn:register'" in said[0], said
        assert "'bench.models'" in said[0] and "'lawbench.models'" in said[0]
        assert load_entry_points(deprecated=said.append) == [] and len(said) == 1  # loaded: skipped, not said again
        assert load_entry_points("bench.other-group") == []
    finally:
        for mod in ("lawbench_ep_mod", "lawbench_ep_fn"):
            sys.modules.pop(mod, None)


def test_broken_entry_point_is_named(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "lawbench_broken_plugins",
                       "[bench.test-broken]\nbroken = lawbench_no_such_module_ep:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError) as ei:
        load_entry_points("bench.test-broken")
    msg = _one_line(ei.value)
    assert "'broken = lawbench_no_such_module_ep:register'" in msg and "bench.test-broken" in msg


# ------------------------------------------------------------------------------------------- checkpoints

def _outputs_equal(a, b, shape):
    a.eval(), b.eval()
    x = torch.rand(4, *shape)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("wrn16", (3, 8, 8))])
def test_checkpoint_round_trip(tmp_path, name, shape):
    torch.manual_seed(0)
    src = get_model(name, in_shape=shape, num_classes=10, width=2)
    if name == "wrn16":  # give BatchNorm non-default running statistics
        src.train()
        src(torch.rand(8, *shape))
    path = save_checkpoint(src, tmp_path / "sub" / "model.pt", meta={"width": 2, "note": "x"})
    assert path.is_file() and sorted(os.listdir(path.parent)) == ["model.pt"]  # no temp file left behind
    torch.manual_seed(1)
    dst = get_model(name, in_shape=shape, num_classes=10, width=2)
    assert not _outputs_equal(src, dst, shape)
    assert load_checkpoint(dst, path, sha256=hashlib.sha256(path.read_bytes()).hexdigest()) is dst
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    assert _outputs_equal(src, dst, shape)
    assert torch.load(path, weights_only=True)["meta"] == {"width": 2, "note": "x"}


def test_checkpoint_accepted_layouts(tmp_path):
    torch.manual_seed(0)
    src = get_model("mlp", in_shape=(6,), num_classes=3, width=4)
    sd = src.state_dict()
    layouts = {"raw": sd, "model": {"model": sd, "epoch": 3}, "dp": {f"module.{k}": v for k, v in sd.items()}}
    for tag, obj in layouts.items():
        torch.save(obj, tmp_path / f"{tag}.pt")
        dst = get_model("mlp", in_shape=(6,), num_classes=3, width=4)
        load_checkpoint(dst, tmp_path / f"{tag}.pt")
        assert all(torch.equal(v, dst.state_dict()[k]) for k, v in sd.items()), tag


def test_save_checkpoint_failure_keeps_previous_file(tmp_path):
    m = get_model("mlp", in_shape=(4,), num_classes=2, width=2)
    path = save_checkpoint(m, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(m, path, meta={"bad": lambda: 0})  # cannot be pickled
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pt"]


def test_checkpoint_sha256_mismatch(tmp_path):
    m = get_model("mlp", in_shape=(4,), num_classes=2, width=2)
    path = save_checkpoint(m, tmp_path / "weights.pt")
    assert models.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ModelError) as ei:
        load_checkpoint(m, path, sha256="0" * 64)
    msg = _one_line(ei.value)
    assert "weights.pt" in msg and "sha256 mismatch" in msg
    with pytest.raises(ModelError, match="64 hexadecimal"):
        load_checkpoint(m, path, sha256="abc")
    with pytest.raises(ModelError, match="not found"):
        load_checkpoint(m, tmp_path / "nope.pt")


def test_checkpoint_architecture_mismatch(tmp_path):
    path = save_checkpoint(get_model("mlp", in_shape=(4,), num_classes=2, width=8), tmp_path / "w8.pt")
    with pytest.raises(ModelError) as ei:
        load_checkpoint(get_model("mlp", in_shape=(4,), num_classes=2, width=9), path)
    msg = _one_line(ei.value)
    assert msg.startswith(f"checkpoint {path} does not match the architecture: shape mismatch for '1.weight'")
    assert "(8, 4)" in msg and "(9, 4)" in msg and "more problems" in msg
    sd = get_model("mlp", in_shape=(4,), num_classes=2, width=8).state_dict()
    torch.save({k: v for k, v in sd.items() if k != "3.bias"}, tmp_path / "missing.pt")
    with pytest.raises(ModelError, match=r"missing.pt does not match the architecture: missing key '3.bias'$"):
        load_checkpoint(get_model("mlp", in_shape=(4,), num_classes=2, width=8), tmp_path / "missing.pt")
    torch.save({"state_dict": {**sd, "head.weight": torch.zeros(2)}}, tmp_path / "extra.pt")
    with pytest.raises(ModelError, match=r"extra.pt does not match the architecture: unexpected key 'head.weight'$"):
        load_checkpoint(get_model("mlp", in_shape=(4,), num_classes=2, width=8), tmp_path / "extra.pt")
    deep = save_checkpoint(get_model("mlp-deep", in_shape=(4,), num_classes=2, width=8, depth=2), tmp_path / "d.pt")
    with pytest.raises(ModelError, match=r"d.pt does not match the architecture: shape mismatch for '3.weight'.*"
                                         r"\(and 3 more problems\)"):
        load_checkpoint(get_model("mlp", in_shape=(4,), num_classes=2, width=8), deep)


def test_checkpoint_unsafe_or_corrupt_file(tmp_path):
    m = get_model("mlp", in_shape=(4,), num_classes=2, width=2)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match=r"junk.pt: not a readable torch checkpoint of tensors"):
        load_checkpoint(m, tmp_path / "junk.pt")
    torch.save({"state_dict": m.state_dict(), "obj": _RefBlock}, tmp_path / "pickled.pt")  # arbitrary global
    with pytest.raises(ModelError, match=r"pickled.pt: refused: the file holds Python objects beyond tensors "
                                         r"\(the first is [\w.]*_RefBlock\)") as info:
        load_checkpoint(m, tmp_path / "pickled.pt")
    assert "weights_only" not in str(info.value)  # never an invitation to unpickle untrusted code
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"list.pt: expected a state dict"):
        load_checkpoint(m, tmp_path / "list.pt")


def _write_entry(path, body):
    path.write_text(textwrap.dedent(body))
    return path


def test_checkpoint_entry_parsing_and_build(tmp_path):
    torch.manual_seed(0)
    src = get_model("cnn", in_shape=(1, 8, 8), num_classes=10, width=1)
    ck = save_checkpoint(src, tmp_path / "weights" / "cnn1.pt")
    digest = models.sha256_file(ck)
    toml = _write_entry(tmp_path / "entry.toml", f"""
        name = "cnn1-digits"
        model = "cnn"
        width = 1
        dataset = "digits"
        checkpoint = "weights/cnn1.pt"
        sha256 = "{digest.upper()}"
        description = "test entry"
        [kwargs]
    """)
    e = read_checkpoint_entry(toml)
    assert (e.name, e.model, e.width, e.dataset, e.sha256, e.kwargs) == ("cnn1-digits", "cnn", 1, "digits", digest, {})
    assert e.checkpoint == str(ck.resolve()) and not e.is_url
    m = models.build_from_entry(e, in_shape=(1, 8, 8), num_classes=10)
    assert not m.training and _outputs_equal(src, m, (1, 8, 8))
    assert [x.name for x in models.list_checkpoint_entries(tmp_path)] == ["cnn1-digits"]


def test_checkpoint_entry_kwargs_passed(tmp_path):
    save_checkpoint(get_model("mlp-deep", in_shape=(5,), num_classes=2, width=3, depth=2), tmp_path / "d.pt")
    e = read_checkpoint_entry(_write_entry(tmp_path / "deep.toml", """
        name = "deep"
        model = "mlp-deep"
        width = 3
        dataset = "gauss"
        checkpoint = "d.pt"
        [kwargs]
        depth = 2
    """))
    assert e.kwargs == {"depth": 2}
    assert count_params(models.build_from_entry(e, in_shape=(5,), num_classes=2)) == 5 * 3 + 3 + 12 + 8


BASE_ENTRY = {"name": '"e"', "model": '"mlp"', "width": "4", "dataset": '"gauss"', "checkpoint": '"w.pt"'}


@pytest.mark.parametrize("change,pattern", [
    ({"model": None}, "missing required key 'model'"),
    ({"checkpoint": None}, "missing required key 'checkpoint'"),
    ({"width": '"4"'}, "key 'width' must be a positive integer"),
    ({"width": "0"}, "key 'width' must be a positive integer"),
    ({"name": '""'}, "key 'name' must be a non-empty string"),
    ({"sha256": '"xyz"'}, "key 'sha256'.*64 hexadecimal"),
    ({"kwargs": '"depth=2"'}, "key 'kwargs' must be a table"),
    ({"widht": "4"}, "unknown key 'widht'"),
    ({"checkpoint": '"https://example.org/w.pt"'}, "key 'sha256' is required"),
])
def test_checkpoint_entry_errors(tmp_path, change, pattern):
    fields = {**BASE_ENTRY, **change}
    path = tmp_path / "bad.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None))
    with pytest.raises(ModelError) as ei:
        read_checkpoint_entry(path)
    msg = _one_line(ei.value)
    assert msg.startswith(str(path)), msg
    assert re.search(pattern, msg), msg


def test_checkpoint_entry_file_errors(tmp_path):
    with pytest.raises(ModelError, match=r"missing.toml: checkpoint entry file not found"):
        read_checkpoint_entry(tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text('name = "unterminated\n')
    with pytest.raises(ModelError, match=r"broken.toml: invalid TOML"):
        read_checkpoint_entry(tmp_path / "broken.toml")
    folder = tmp_path / "entries"
    folder.mkdir()
    (folder / "a.toml").write_text("".join(f"{k} = {v}\n" for k, v in BASE_ENTRY.items()))
    (folder / "b.toml").write_text("".join(f"{k} = {v}\n" for k, v in BASE_ENTRY.items()))
    with pytest.raises(ModelError, match=r"b.toml: checkpoint entry name 'e' is also used by .*a.toml"):
        models.list_checkpoint_entries(folder)


def test_checkpoint_entry_url_download(tmp_path, monkeypatch):
    torch.manual_seed(0)
    src = get_model("mlp", in_shape=(6,), num_classes=3, width=4)
    remote = save_checkpoint(src, tmp_path / "remote" / "w.pt")
    digest = hashlib.sha256(remote.read_bytes()).hexdigest()
    url = remote.as_uri()
    assert url.startswith("file://")
    entry_dir = tmp_path / "entries"
    entry_dir.mkdir()
    e = read_checkpoint_entry(_write_entry(entry_dir / "url.toml", f"""
        name = "url-entry"
        model = "mlp"
        width = 4
        dataset = "gauss"
        checkpoint = "{url}"
        sha256 = "{digest}"
    """))
    assert e.is_url and e.checkpoint == url
    # every download goes through urllib.request.urlopen: count the requests for our URL
    requests = []
    real_urlopen = urllib.request.urlopen

    def counting_urlopen(req, *args, **kwargs):
        requests.append(req if isinstance(req, str) else req.full_url)
        return real_urlopen(req, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counting_urlopen)
    cache = tmp_path / "cache"
    local = e.local_path(cache)
    assert requests == [url]
    assert local.parent == cache and local.read_bytes() == remote.read_bytes()
    assert sorted(os.listdir(cache)) == [local.name]
    first = local.stat()
    m = models.build_from_entry(e, in_shape=(6,), num_classes=3, cache_dir=cache)
    assert _outputs_equal(src, m, (6,))
    assert e.local_path(cache) == local
    # cached: neither build_from_entry nor the second local_path fetched it again, nor rewrote the file
    assert requests == [url]
    again = local.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    # a cached file that no longer matches its sha256 is not trusted: fetched again and replaced
    local.write_bytes(b"corrupted cache")
    assert e.local_path(cache) == local and requests == [url, url]
    assert local.read_bytes() == remote.read_bytes() and sorted(os.listdir(cache)) == [local.name]

    with pytest.raises(ModelError) as ei:
        models.fetch_checkpoint(url, "f" * 64, cache_dir=tmp_path / "cache2")
    msg = _one_line(ei.value)
    assert url in msg and "sha256 mismatch" in msg
    assert os.listdir(tmp_path / "cache2") == []  # the bad download is not kept
    with pytest.raises(ModelError, match="download failed"):
        models.fetch_checkpoint((tmp_path / "gone.pt").as_uri(), digest, cache_dir=cache)
