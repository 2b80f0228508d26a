"""Through the CLI: a model with a layer certify cannot verify is still attacked (ok row, uncertified flag), and
an AutoAttack example lost to projection is re-attacked and recorded in the row."""
import textwrap

from conftest import ROOT, TINY, bench_cli
from reports.rows import read_rows

PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn
    from models import register_model

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


def _run_plugin_model(tmp_path, model: str):
    """One tiny cell of a plugin model through the CLI: (completed process, its row)."""
    (tmp_path / "trust_plugin.py").write_text(PLUGIN)
    out = tmp_path / "out"
    over = [a for a in TINY if not a.startswith("width=")] + ["width=16"]
    res = bench_cli("run", *over, f"model={model}", "--plugin", "trust_plugin", "--out", str(out),
                    env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert res.returncode == 0, res.stdout + res.stderr
    (row,) = read_rows(out / "results.jsonl")
    return res, row


def test_uncertifiable_model_is_attacked_and_flagged(tmp_path):
    res, row = _run_plugin_model(tmp_path, "trust-scaled")
    assert row["status"] == "ok"
    assert row["lip_upper"] is None and set(row["cert_acc"].values()) == {None}
    assert "uncertified" in row["flags"]
    assert "Scaled" in row["uncertified"] and "overrides forward" in row["uncertified"]
    assert row["robust_acc"]["0.1"] is not None and row["robust_acc"]["0.1"] <= row["clean_acc"]
    assert row["lip_lower"] > 0
    assert "uncertified" in res.stdout


def test_quantized_model_row_records_reattacks(tmp_path):
    _, row = _run_plugin_model(tmp_path, "trust-quant")
    assert row["status"] == "ok"
    check = row["attack_check"]["0.1"]["autoattack"]
    assert row["reattacked"]["0.1"] == check["reattacked"] + row["attack_check"]["0.1"]["pgd"]["reattacked"]
    # MNIST pixels sit on the k/255 grid and 0.1 = 25.5/255: pyautoattack's ulp overshoot loses examples
    assert check["lost"] > 0 and check["recovered"] > 0 and "reattacked" in row["flags"]
    assert row["lip_upper"] is None and "Quant" in row["uncertified"]  # a custom module: never certified
