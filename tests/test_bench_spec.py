import pytest

from bench.spec import SpecError, build_spec, cell_id, expand, list_presets, parse_override, train_key


def test_default_preset_expands_to_width_family():
    spec = build_spec()
    cells = expand(spec)
    for recipe in ("erm", "smooth"):  # the law's setting: ERM beside the smoothest interpolator, on noisy labels
        assert [c["width"] for c in cells if c["recipe"] == recipe] == spec["width"]
    assert all(c["dataset"] == "mnist5k" and c["threat"] == "Linf" and c["label_noise"] == 0.1 for c in cells)
    assert all(("smooth_epochs" in c) == (c["recipe"] == "smooth") for c in cells)
    assert len({cell_id(c) for c in cells}) == len(cells)


def test_overrides_parse_toml_values_and_bare_words():
    assert parse_override("width=[1,2]") == ("width", [1, 2])
    assert parse_override("dataset=digits") == ("dataset", "digits")
    assert parse_override("lr=0.01") == ("lr", 0.01)
    assert parse_override("threat=[Linf,L2]") == ("threat", ["Linf", "L2"])
    assert parse_override("threat=['Linf', 'L2']") == ("threat", ["Linf", "L2"])
    assert parse_override("eps_Linf=[0.1, 0.2]") == ("eps_Linf", [0.1, 0.2])
    spec = build_spec("default", ["width=[3]", "data_options.d=12", "label_noise=0"])
    assert spec["width"] == [3] and spec["data_options"] == {"d": 12}
    assert spec["label_noise"] == 0.0 and isinstance(spec["label_noise"], float)


def test_cell_id_changes_with_results_relevant_settings_only():
    a = expand(build_spec("default", ["width=8"]))[0]
    b = expand(build_spec("default", ["width=8", "pgd_steps=7"]))[0]
    c = expand(build_spec("default", ["width=8", "description=other words"]))[0]
    assert cell_id(a) != cell_id(b)
    assert train_key(a) == train_key(b)  # evaluation settings share the trained weights
    assert cell_id(a) == cell_id(c)


def test_threat_axis_keeps_each_threats_own_eps():
    cells = expand(build_spec("default", ["width=8", "threat=['Linf','L2']"]))
    by_threat = {c["threat"]: c for c in cells}
    assert by_threat["Linf"]["eps"] == [0.05, 0.1, 0.2, 0.3]
    assert by_threat["L2"]["eps"] == [0.5, 1.0, 1.5, 2.0]
    assert train_key(by_threat["Linf"]) == train_key(by_threat["L2"])


def test_train_eps_axis_collapses_for_erm():
    cells = expand(build_spec("default", ["width=8", "recipe=erm", "train_eps=[0.1,0.2]"]))
    assert len(cells) == 1 and cells[0]["train_eps"] == 0.0
    cells = expand(build_spec("default", ["width=8", "recipe=pgd-at", "train_eps=[0.1,0.2]"]))
    assert sorted(c["train_eps"] for c in cells) == [0.1, 0.2]


@pytest.mark.parametrize("override, culprit", [
    ("widht=3", "widht"), ("width=0", "width"), ("width=-4", "width"), ("width=abc", "width"),
    ("eps_Linf=[-0.1]", "eps_Linf"), ("eps_Linf=[1.5]", "eps_Linf"), ("threat=L3", "L3"),
    ("label_noise=1.5", "label_noise"), ("autoattack=maybe", "autoattack"), ("aa_eps_Linf=[0.7]", "aa_eps_Linf"),
    ("epochs=0", "epochs"), ("nonsense", "nonsense"),
])
def test_bad_values_name_the_culprit(override, culprit):
    with pytest.raises(SpecError, match=culprit):
        build_spec("default", [override])


def test_presets_are_valid():
    names = list_presets()
    assert {"default", "control", "madry", "law", "law-n", "law-d", "law-mnist", "cifar10"} <= set(names)
    for name in names:
        assert expand(build_spec(name))
    with pytest.raises(SpecError, match="unknown preset 'nope'"):
        build_spec("nope")


def test_at_epochs_is_pgd_at_s_own_budget_and_moves_no_other_cell():
    """at_epochs sets the epochs of pgd-at cells alone: other recipes' cells (and ids) are those of a spec without
    it, and a pgd-at cell given at_epochs=E is the cell given epochs=E (the same training, the same id)."""
    from bench.spec import build_spec, cell_id, expand
    base = ["recipe=[erm,pgd-at]", "train_eps=0.1", "epochs=300", "width=40"]
    plain = {c["recipe"]: c for c in expand(build_spec("default", base))}
    with_at = {c["recipe"]: c for c in expand(build_spec("default", [*base, "at_epochs=20"]))}
    assert cell_id(with_at["erm"]) == cell_id(plain["erm"]) and with_at["erm"]["epochs"] == 300
    assert with_at["pgd-at"]["epochs"] == 20 and "at_epochs" not in with_at["pgd-at"]
    (direct,) = expand(build_spec("default", ["recipe=pgd-at", "train_eps=0.1", "epochs=20", "width=40"]))
    assert cell_id(with_at["pgd-at"]) == cell_id(direct)
    assert cell_id(plain["pgd-at"]) != cell_id(direct)


def test_a_preset_s_attack_options_leave_with_its_attacks():
    """`law attacks=[pgd]` runs PGD alone: the preset's options for its fast suite go with the suite; options the
    command line itself gives an attack it does not run are still refused."""
    spec = build_spec("law", ["attacks=[pgd]"])
    assert spec["attacks"] == ["pgd"] and "fast" not in spec["attack"]
    assert build_spec("law")["attack"]["fast"] == {"square_queries": 100}
    with pytest.raises(SpecError, match="attack.fast"):
        build_spec("law", ["attacks=[pgd]", "attack.fast.square_queries=10"])
    with pytest.raises(SpecError, match="attack.fast"):
        build_spec("default", ["attacks=[pgd]", "attack={fast={square_queries=10}}"])


def test_the_command_lines_executor_reads_the_command_lines_options(cli):
    """`default --executor slurm executor.partition=debug` was refused (the option checked against the preset's pool
    before the flag applied): the flag now names the executor its options are checked against, and the preset's
    options of another executor are left behind; an option the command line gives the wrong executor stays an error."""
    table = build_spec("default", ["executor.partition=debug", "executor.time_min=7"], {"name": "slurm"})["executor"]
    assert table["name"] == "slurm" and table["partition"] == "debug" and table["time_min"] == 7
    assert build_spec("default", [], {"name": "ray", "address": "auto"})["executor"]["address"] == "auto"
    with pytest.raises(SpecError, match="'executor.workers': an option of pool, not of executor 'slurm'"):
        build_spec("default", ["executor.workers=2"], {"name": "slurm"})
    with pytest.raises(SpecError, match="'executor.partition': an option of slurm, not of executor 'pool'"):
        build_spec("default", ["executor.partition=debug"])
    res = cli("run", "default", "n_train=200", "--executor", "slurm", "executor.partition=debug", "--dry-run")
    assert res.returncode == 0 and res.stderr == "", res.stderr
