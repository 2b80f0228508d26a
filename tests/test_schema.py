"""The result row is declared once (reports.schema): the runner writes only declared keys, every reader names only
declared keys, the README's table is the schema's, the eps keys round-trip, and a row that breaks the schema is
named."""
from __future__ import annotations

import ast
import json
import math

import pytest

from conftest import ROOT
from lawbench.reports import schema
from lawbench.reports.schema import FIELD, REQUIRED_KEYS, check_row, eps_key, parse_eps_key, undeclared

# the benchmarks' own result dicts are not rows
NOT_ROWS = {"bench/perf.py", "bench/scale_perf.py", "bench/attacks_perf.py", "bench/certify_cost.py",
            "bench/equivalence.py"}
ROW_NAMES = {"row", "r", "failed", "base"}
KEY_READERS = {"acc_at", "acc_map", "num", "text", "verified_at"}


def row_keys_in_source() -> dict[str, set[str]]:
    """Every string key the code reads or writes on a row: row["k"], row.get("k"), row.update(k=...),
    acc_at(row, "k", ...), num(row.get("k")), in bench/ and reports/."""
    found: dict[str, set[str]] = {}
    for folder in ("bench", "reports"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in NOT_ROWS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                for key in _keys(node):
                    found.setdefault(key, set()).add(rel)
    return found


def _is_row(node) -> bool:
    return isinstance(node, ast.Name) and node.id in ROW_NAMES


def _keys(node) -> list[str]:
    const = lambda n: n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else None  # noqa: E731
    if isinstance(node, ast.Subscript) and _is_row(node.value) and const(node.slice):
        return [const(node.slice)]
    if not isinstance(node, ast.Call):
        return []
    f = node.func
    if isinstance(f, ast.Attribute) and _is_row(f.value):
        if f.attr in ("get", "pop", "setdefault") and node.args and const(node.args[0]):
            return [const(node.args[0])]
        if f.attr == "update":
            return [k.arg for k in node.keywords if k.arg]
    if isinstance(f, ast.Name) and f.id in KEY_READERS and len(node.args) >= 2 and _is_row(node.args[0]) \
            and const(node.args[1]):
        return [const(node.args[1])]
    return []


def test_every_row_key_the_code_names_is_declared():
    keys = row_keys_in_source()
    assert len(keys) > 40  # the scan sees the code
    missing = {k: sorted(v) for k, v in keys.items() if k not in FIELD}
    assert not missing, f"row keys used but not declared in reports/schema.py: {missing}"


def test_the_scan_catches_a_renamed_key(tmp_path):
    """The scan is the one that fails on a key written outside the schema (here: a typo'd row key)."""
    tree = ast.parse('row["lip_lowr"] = 1\nrow.update(lip_gapp=2)\nacc_at(row, "robust_accc", 0.1)')
    keys = [k for node in ast.walk(tree) for k in _keys(node)]
    assert sorted(keys) == ["lip_gapp", "lip_lowr", "robust_accc"]
    assert not set(keys) & set(FIELD)


def test_readme_row_table_is_the_schema():
    text = (ROOT / "README.md").read_text()
    begin, end = "<!-- row-schema:begin -->\n", "\n<!-- row-schema:end -->"
    table = text[text.index(begin) + len(begin):text.index(end)]
    assert table == schema.markdown_table(), (
        "README's row table differs from reports/schema.py: paste the output of "
        "python -c 'from lawbench.reports.schema import markdown_table; print(markdown_table())'")
    for key in REQUIRED_KEYS:
        assert f"| `{key}` |" in table


def test_design_required_keys_are_required():
    """The keys the design promises in every row (DESIGN.md's list) are required by the schema; interpolates is
    declared, optional for rows of older versions that lack it."""
    promised = ("cell_id bench_version status error dataset n_train n_test d d_eff label_noise num_classes model "
                "family width params recipe train_eps seed device train_acc clean_acc threat eps pgd_acc "
                "autoattack_acc robust_acc cert_acc lip_upper lip_lower ratio ratio_eff law_scale aa_flags "
                "timings").split()
    assert set(promised) <= set(REQUIRED_KEYS)
    assert "interpolates" in FIELD


@pytest.mark.parametrize("eps", [0.1, 0.3, 8 / 255, 1e-5, 0.1 + 0.2, 1.0, 2.0, 0.0, 1 / 3])
def test_eps_keys_round_trip_exactly(eps):
    k = eps_key(eps)
    assert isinstance(k, str) and parse_eps_key(k) == eps
    assert json.loads(json.dumps({k: 1}))[k] == 1


@pytest.mark.parametrize("key, value", [("0.10", 0.1), (" 0.1 ", 0.1), ("1", 1.0), (0.5, 0.5)])
def test_eps_keys_from_other_writers_read_back(key, value):
    assert parse_eps_key(key) == value


@pytest.mark.parametrize("key", ["x", "", None, "nan", "inf", True, [0.1]])
def test_bad_eps_keys_are_refused(key):
    assert parse_eps_key(key) is None


def valid_row() -> dict:
    from test_bad_input import valid_row as row
    return row()


def test_a_valid_row_and_the_report_fixtures_match_the_schema():
    from test_reports import fixture_rows
    assert check_row(valid_row()) == []
    for row in fixture_rows():
        assert check_row(row) == [], row["cell_id"]


@pytest.mark.parametrize("key, value, why", [
    ("clean_acc", {}, "clean_acc is {}, expected a finite number in [0, 1]"),
    ("clean_acc", 1.5, "clean_acc is 1.5, expected a finite number in [0, 1]"),
    ("lip_lower", math.inf, "lip_lower is inf, expected a finite number >= 0"),
    ("lip_upper", math.nan, "lip_upper is nan, expected a finite number >= 0"),
    ("params", 6370.5, "params is 6370.5, expected an integer >= 1"),
    ("params", True, "params is True, expected an integer >= 1"),
    ("pgd_acc", {"0.1": "high"}, "pgd_acc is {'0.1': 'high'}, expected a map eps → accuracy in [0,1] or null"),
    ("pgd_acc", {"wide": 0.1}, "pgd_acc is {'wide': 0.1}, expected a map eps"),
    ("aa_flags", "zero_gradients", "aa_flags is 'zero_gradients', expected a list of strings"),
    ("eps", [0.1, "0.2"], "eps is [0.1, '0.2'], expected a list of finite numbers >= 0"),
    ("status", "done", "status is 'done', expected one of ok, failed"),
    ("cell_id", None, "cell_id is null"),
    ("clean_acc", None, "clean_acc is null"),
    ("verified", {"0.1": "yes"}, "verified is {'0.1': 'yes'}, expected a map eps → boolean"),
])
def test_check_row_names_what_is_wrong(key, value, why):
    row = valid_row()
    row[key] = value
    problems = check_row(row)
    assert len(problems) == 1 and problems[0].startswith(why), problems


def test_check_row_missing_keys_and_non_objects():
    row = valid_row()
    del row["lip_lower"], row["threat"]
    assert check_row(row) == ["threat is missing", "lip_lower is missing"]
    assert check_row([1, 2]) == ["the row is list, expected a JSON object"]


def test_a_failed_row_may_hold_nulls_where_nothing_was_measured():
    from bench.runner import base_row
    from bench.spec import build_spec, expand
    cell = expand(build_spec("default", ["width=8", "recipe=erm"]))[0]
    row = base_row(cell)
    row.update(error="RuntimeError: boom", timings={"total": 0.1})
    assert set(REQUIRED_KEYS) <= set(row) and undeclared(row) == []
    assert check_row(row) == []
    row["cell_id"] = None
    assert check_row(row) == ["cell_id is null"]


def test_the_runner_refuses_a_key_outside_the_schema():
    """check_invariants (run on every row before it is stored) fails a row with an undeclared or mistyped key: the
    cell is then a failed row naming it, never a stored row no reader knows."""
    from bench.runner import InvariantError, check_invariants
    row = valid_row()
    row.update(verified={"0.1": True})
    check_invariants(row)
    with pytest.raises(InvariantError, match="not declared in reports.schema: lip_lowr"):
        check_invariants({**row, "lip_lowr": 1.0})
    with pytest.raises(InvariantError, match="lip_lower is '10'"):
        check_invariants({**row, "lip_lower": "10"})


def test_invariant_chain_reads_the_schema():
    from bench.runner import InvariantError, check_invariants
    row = valid_row()
    row["cert_acc"] = {"0.1": 0.06}  # above robust_acc 0.05
    with pytest.raises(InvariantError, match="cert_acc 0.06 > robust_acc 0.05"):
        check_invariants(row)
    assert schema.ACC_CHAIN == ("cert_acc", "robust_acc", "pgd_acc", "clean_acc")


def test_every_field_is_well_formed():
    for f in schema.FIELDS:
        assert f.kind in schema.KINDS, f.name
        assert f.meaning and f.phase in ("cell", "data", "model", "train", "fit", "attack", "lipschitz", "certify",
                                         "law", "run"), f.name
    assert len(FIELD) == len(schema.FIELDS)


def test_the_reports_key_lists_come_from_the_schema():
    """The CSV's scalar columns are the schema's required scalars; what groups rows into a configuration is declared."""
    from lawbench.reports.csvexport import SCALARS
    from lawbench.reports.table import CONFIG_KEYS
    assert set(SCALARS) == {f.name for f in schema.FIELDS if f.required and f.kind in ("str", "int", "float", "bool")}
    assert set(CONFIG_KEYS) <= set(FIELD)
    assert set(schema.ACC_KEYS) == {"pgd_acc", "autoattack_acc", "robust_acc", "cert_acc"}


def test_the_runner_judges_the_row_as_it_will_be_stored():
    """The store writes NaN and infinity as null: where the schema allows null (d_eff of data it cannot estimate) the
    row is fine, where it does not (an ok row's law_scale) the cell fails naming it."""
    from bench.runner import InvariantError, check_invariants
    row = valid_row()
    row.update(verified={"0.1": True}, d_eff=math.nan, lip_gap=math.inf)
    check_invariants(row)
    with pytest.raises(InvariantError, match="law_scale is null"):
        check_invariants({**row, "law_scale": math.nan})


def test_n_total_is_the_suites_not_a_spec_option():
    from lawbench.attacks.registry import attack_options
    assert "n_total" not in attack_options("autoattack") and "batch_size" in attack_options("autoattack")
