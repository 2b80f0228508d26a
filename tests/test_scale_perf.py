"""`python -m bench perf --scale --quick`: the executor and contention benchmark end to end at tiny sizes (its
numbers are meaningless here; the targets are checked by running it at full size, never in a timed test)."""
from __future__ import annotations

import json

import bench.perf as perf


def test_scale_quick_writes_json(tmp_path, capsys, monkeypatch, slurm_cluster, ray_cluster):
    """The grid through every executor: a real SLURM cluster's job array (the session's one-node cluster) and a real
    two-node Ray cluster joined by address (the session's), as the README's cluster lines run."""
    out = tmp_path / "scale.json"
    for k, v in slurm_cluster.env.items():
        monkeypatch.setenv(k, v)
    ray = ["--ray-address", ray_cluster.address, "--ray-node-ip", ray_cluster.host]
    assert perf.main(["--scale", "--quick", "--json", str(out), *ray]) == 0
    res = json.loads(out.read_text())
    assert res["ray_cluster"] == ray_cluster.address
    assert set(res["executors"]) == {"local", "pool", "ray", "slurm"} and "slurm_skipped" not in res
    for name, run in res["executors"].items():
        assert run["cells"] == 4 and run["seconds"] > 0
        assert run["cells_per_minute"] == round(60 * 4 / run["seconds"], 2)
        # pool and ray run 2 workers x 1 thread; local chooses per phase within its budget
        chosen = {int(n) for phase in run["threads_chosen"].values() for n in phase}
        assert chosen <= ({1} if name != "local" else set(range(1, res["cpus"] + 1)))
    best = min(res["executors"]["pool"]["seconds"], res["executors"]["ray"]["seconds"])
    assert res["scale_speedup"] == round(res["executors"]["local"]["seconds"] / best, 3)
    assert res["contention_slowdown"] == round(res["default_loaded"]["seconds"] / res["default_quiet"]["seconds"], 3)
    assert res["default_quiet"]["cells"] == res["default_loaded"]["cells"] == 2
    assert set(res["targets"]) == {"scale_speedup>=1.25", "contention_slowdown<=2.0"}
    printed = capsys.readouterr().out
    assert "scale_speedup" in printed and "grid, slurm" in printed and "per minute" in printed
