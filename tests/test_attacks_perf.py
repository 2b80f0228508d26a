"""`python -m bench perf` smoke test at tiny sizes (the numbers themselves are meaningless here)."""
import json

import bench.perf as perf


def test_perf_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "perf.json"
    assert perf.main(["--quick", "--json", str(out), "--cache", str(tmp_path / "cache")]) == 0
    res = json.loads(out.read_text())
    for key in ("pgd_speedup_undefended", "pgd_speedup_robust", "flops_fraction", "aa_time_ratio",
                "multimodel_speedup", "pgd_acc_undefended_ours", "pgd_acc_undefended_torchattacks",
                "pgd_acc_robust_ours", "pgd_acc_robust_torchattacks", "aa_acc_ours", "aa_acc_alone",
                "matmul_peak_gflops", "targets"):
        assert key in res, key
    assert res["pgd_speedup_undefended"] > 0 and 0 < res["flops_fraction"]
    assert set(res["pgd_acc_robust_ours"]) == {"0.05", "0.1", "0.2", "0.3"}
    assert all(0 <= v <= 1 for v in res["pgd_acc_undefended_ours"].values())
    assert res["autoattack"]["acc_ours"] <= res["autoattack"]["acc_pgd_only"]
    assert all(v["auto_layout"] in ("stacked", "sequential") for v in res["multimodel"].values())
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").glob("*.pt"))
    # second run: models come from the cache
    out2 = tmp_path / "perf2.json"
    assert perf.main(["--quick", "--no-aa", "--json", str(out2), "--cache", str(tmp_path / "cache")]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["models_cached"] is True and "aa_time_ratio" not in res2
    assert "pgd_speedup_undefended" in capsys.readouterr().out
