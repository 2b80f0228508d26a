"""Through the CLI: a model with a layer certify cannot verify is still attacked (ok row, uncertified flag), and
a quantizing model is verified at every eps by the default suite and flagged in the row's flags."""
import textwrap

from conftest import ROOT, TINY, bench_cli
from lawbench.attacks.fast import MASKED_STARTS
from lawbench.reports.rows import read_rows

PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn
    from lawbench.models import register_model

    class Scaled(nn.ReLU):
        """A ReLU subclass that scales its output: certify must refuse to bound it."""
        def forward(self, x):
            return 3 * torch.relu(x)

    class Quant(nn.Module):
        def forward(self, x):
            return torch.round(x * 255) / 255

    @register_model("trust-scaled", family="trust", default_widths=(16,), datasets=("mnist5k",))
    def scaled(in_shape, num_classes, width, **kw):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, width), Scaled(), nn.Linear(width, num_classes))

    @register_model("trust-quant", family="trust", default_widths=(16,), datasets=("mnist5k",))
    def quant(in_shape, num_classes, width, **kw):
        return nn.Sequential(Quant(), nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, num_classes))
''')


def _run_plugin_model(tmp_path, model: str, *extra: str):
    """One tiny cell of a plugin model through the CLI: (completed process, its row)."""
    (tmp_path / "trust_plugin.py").write_text(PLUGIN)
    out = tmp_path / "out"
    own = tuple(e.split("=")[0] + "=" for e in extra)  # keys the caller sets replace TINY's
    over = [a for a in TINY if not a.startswith(("width=", *own))] + ["width=16", *extra]
    res = bench_cli("run", *over, f"model={model}", "--plugin", "trust_plugin", "--out", str(out),
                    env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stdout + res.stderr
    (row,) = read_rows(out / "results.jsonl")
    return res, row


def _scaled_net(tmp_path, row):
    """trust-scaled rebuilt from its checkpoint as plain tensor algebra (no plugin import): x -> W2 3relu(W1 x)."""
    import torch
    (ckpt,) = (tmp_path / "out" / "checkpoints").glob(f"{row['train_key']}.pt")
    sd = {k: v.double() for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    w1, b1, w2, b2 = sd["1.weight"], sd["1.bias"], sd["3.weight"], sd["3.bias"]
    return (lambda x: 3 * torch.relu(x.reshape(len(x), -1) @ w1.T + b1) @ w2.T + b2), w1, w2


def test_uncertifiable_model_is_attacked_and_flagged(tmp_path):
    import torch
    from lawbench import datasets
    res, row = _run_plugin_model(tmp_path, "trust-scaled")
    assert row["status"] == "ok"
    assert row["lip_upper"] is None and set(row["cert_acc"].values()) == {None}
    assert "uncertified" in row["flags"]
    assert "Scaled" in row["uncertified"] and "overrides forward" in row["uncertified"]
    # still attacked: PGD broke points at both eps, and AutoAttack ran on what PGD left
    assert all(row["pgd_acc"][e] < row["clean_acc"] for e in ("0.05", "0.1"))
    assert row["autoattack_acc"]["0.1"] is not None and row["aa_attacks"]["0.1"] == ["apgd-ce"]
    # the numbers are the plugin model's own (its 3x ReLU included), recomputed from its checkpoint
    net, w1, w2 = _scaled_net(tmp_path, row)
    data = datasets.load_dataset("mnist5k", n_train=200, n_test=40, seed=0)
    x = data.x_test.double()
    assert row["clean_acc"] == (net(x).argmax(1) == data.y_test).sum().item() / 40
    jac = max(float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(
        lambda z: net(z.unsqueeze(0))[0], xi).reshape(10, -1), 2)) for xi in x[:8])
    product = 3 * float(torch.linalg.matrix_norm(w1, 2) * torch.linalg.matrix_norm(w2, 2))
    assert 0.3 * jac < row["lip_lower"] <= product * (1 + 1e-9)
    assert "uncertified" in res.stdout


def test_quantized_plugin_model_is_verified_and_flagged(tmp_path):
    # the quantizer has zero input gradients: only the black-box Square finds examples
    _, row = _run_plugin_model(tmp_path, "trust-quant", "autoattack=[square]", "attacks=[pgd,fast,autoattack]")
    assert row["status"] == "ok"
    assert row["aa_attacks"]["0.1"] == ["square"]
    # MNIST pixels sit on the k/255 grid and 0.1 = 25.5/255: at eps itself pyautoattack's float32 clipping overshoots
    # the ball by an ulp and the quantizer rounds such examples back; run a hair inside, none is lost to projection
    assert row["attack_check"]["0.1"]["autoattack"]["lost"] == 0
    # the fast suite verified both eps: its Square broke points the gradient stages could not move
    assert row["verified"] == {"0.05": True, "0.1": True}
    assert sum(row["attack_breaks"]["0.1"].values()) > 0
    for k in ("0.05", "0.1"):
        stages = row["attack_details"]["fast"][k]
        assert "apgd-t" not in stages and stages["square"]["starts"] == MASKED_STARTS, stages  # masked: more starts
    # the masking flag is in the row's flags, not only in aa_flags
    assert "zero_gradients" in row["aa_flags"] and "zero_gradients" in row["flags"]
    assert row["lip_upper"] is None and "Quant" in row["uncertified"]  # a custom module: never certified
