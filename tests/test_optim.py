"""bench.optim: training steps without torch._dynamo's import (4.5 s in every fresh process that trains), the same
arithmetic as torch.optim's own methods."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from conftest import SUBPROCESS_ENV

SCRIPT = textwrap.dedent("""
    import copy, sys
    import torch
    from bench import optim
    from bench.train import TrainConfig, train

    def fit(model, cls, options, ours):
        torch.manual_seed(1)
        x, y = torch.rand(96, 20), torch.randint(0, 3, (96,))
        opt = optim.build(cls, model.parameters(), **options) if ours else cls(model.parameters(), **options)
        for i in range(0, 96, 16):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
            (optim.zero_grad(opt) if ours else opt.zero_grad(set_to_none=True))
            loss.backward()
            (optim.step(opt) if ours else opt.step())
        return model.state_dict(), [opt.state[p] for p in model.parameters()]  # not state_dict(): it loads dynamo

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3))
    x, y = torch.rand(64, 20), torch.randint(0, 3, (64,))
    train(copy.deepcopy(net), x, y, TrainConfig(epochs=2, batch_size=16, optimizer="sgd"))
    train(copy.deepcopy(net), x, y, TrainConfig(epochs=2, batch_size=16, optimizer="adam"))
    loaded = "torch._dynamo" in sys.modules
    runs = [(torch.optim.Adam, dict(lr=0.01, weight_decay=1e-3)), (torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
            (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3))]
    ours = [fit(copy.deepcopy(net), cls, kw, True) for cls, kw in runs]
    loaded = loaded or "torch._dynamo" in sys.modules
    theirs = [fit(copy.deepcopy(net), cls, kw, False) for cls, kw in runs]
    same = all(torch.equal(a[k], b[k]) for (a, _), (b, _) in zip(ours, theirs) for k in a)
    same_state = all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for (_, sa), (_, sb) in zip(ours, theirs)
                     for a, b in zip(sa, sb) for k in a)
    print(loaded, "torch._dynamo" in sys.modules, same, same_state)
""")


def test_steps_are_torchs_own_without_loading_torch_dynamo():
    """In a fresh process: training (bench.train, both optimizers) and our steps load no torch._dynamo; the
    parameters and optimizer states after our steps equal torch.optim's own methods' bit for bit (Adam with weight
    decay and with amsgrad, SGD with momentum); torch's own methods do load it (so the test can tell)."""
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=SUBPROCESS_ENV,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "True", "True", "True"]


def test_an_optimizer_with_step_hooks_steps_through_its_wrapper():
    from bench import optim
    net = torch.nn.Linear(3, 2)
    opt = optim.build(torch.optim.SGD, net.parameters(), lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    net(torch.rand(4, 3)).sum().backward()
    before = net.weight.detach().clone()
    optim.step(opt)
    assert seen == ["pre", "post"] and not torch.equal(before, net.weight)
    optim.zero_grad(opt)
    assert all(p.grad is None for p in net.parameters())
