"""`ternqc map` end to end (issue 4): the user's statistics file + `configs/toy_ternary.tq` -> MASE's quantize
config with every layer's own numbers (where stat-to-conf.py copied seq_blocks_0's), read back with `toml`;
`--explain` names the rule (`file:line`) that set each parameter and the rules it overrode."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import toml

from tests.test_cli_support import CONFIGS, DOC_STATS, MASE_DATA, assert_one_clean_error, run_cli

RECIPE = CONFIGS / "toy_ternary.tq"
LINEARS = ("seq_blocks_0", "seq_blocks_2", "seq_blocks_4")
RELUS = ("seq_blocks_1", "seq_blocks_3")
#: MASE's ternary config keys per tensor (shared/MASE.md), and the tensors each op has.
MASE_SUFFIXES = ("width", "scaling_factor", "mean", "median", "max")
OP_TENSORS = {"linear": ("data_in", "weight", "bias"), "relu": ("data_in",)}
EXPLAIN_ROW = re.compile(r"^  (\w+)\s+= (.+?)\s{2,}(\S+):(\d+) \(([^)]*)\)(?:  overrides (.*))?$")


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("map") / "q.toml"
    run = run_cli("map", DOC_STATS, "--rules", RECIPE, "-o", out, "--explain")
    assert run.rc == 0, run
    return run, toml.load(out)


def _stat(stats: dict, node: str, tensor: str, stat: str, field: str) -> float:
    return stats[node]["software"]["args"][tensor]["stat"][stat][field]


def test_document_values_every_layer_its_own(mapped) -> None:
    _, config = mapped
    q = config["passes"]["quantize"]
    # the numbers (acceptance 1)
    assert q["seq_blocks_2"]["config"]["data_in_max"] == 6.567787170410156
    assert q["seq_blocks_2"]["config"]["weight_max"] == 0.099988654255867
    assert q["seq_blocks_2"]["config"]["data_in_median"] == 0.0
    assert q["seq_blocks_1"]["config"]["data_in_median"] == -0.008840139955282211
    assert q["seq_blocks_1"]["config"]["data_in_max"] == 6.567787170410156
    # and in general: each node's median / max are its own statistics in the document's file
    stats = toml.load(DOC_STATS)
    for node, op in [(n, "linear") for n in LINEARS] + [(n, "relu") for n in RELUS]:
        c = q[node]["config"]
        for tensor in OP_TENSORS[op]:
            arg = "data_in_0" if tensor == "data_in" else tensor
            assert c[f"{tensor}_median"] == _stat(stats, node, arg, "range_quantile", "max")
            assert c[f"{tensor}_max"] == _stat(stats, node, arg, "range_min_max", "max")
            assert c[f"{tensor}_mean"] == "NA"


def test_seq_blocks_0_and_3_as_in_the_documents_output(mapped) -> None:
    _, config = mapped
    q = config["passes"]["quantize"]
    doc = toml.load(MASE_DATA / "toy_ternary_scaled_document_output.toml")["passes"]["quantize"]
    for node in ("seq_blocks_0", "seq_blocks_3"):
        for key, value in doc[node]["config"].items():
            assert q[node]["config"][key] == value, (node, key)


def test_mase_layout_every_node_every_key(mapped) -> None:
    _, config = mapped
    q = config["passes"]["quantize"]
    assert q["by"] == "name"
    assert q["default"]["config"]["name"] == "ternary"
    assert q["default"]["config"]["data_in_width"] == 2
    nodes = {k for k in q if k.startswith("seq_blocks_")}
    assert nodes == set(LINEARS) | set(RELUS)
    for node in nodes:
        c = q[node]["config"]
        op = "linear" if node in LINEARS else "relu"
        assert c["name"] == "ternary"
        for tensor in OP_TENSORS[op]:
            for suffix in MASE_SUFFIXES:
                assert f"{tensor}_{suffix}" in c, (node, tensor, suffix)
        for tensor in set(OP_TENSORS["linear"]) - set(OP_TENSORS[op]):
            assert not any(k.startswith(tensor + "_") for k in c), (node, tensor)
        # unset is spelled "NA", never left out or written as something else
        assert all(v == "NA" or isinstance(v, (int, float, str)) for v in c.values())
        assert c["data_in_threshold"] == "NA" and c["data_in_scale"] == "NA"


def _rule_lines(path: Path) -> dict[tuple[str, str], int]:
    """(selector, param) -> line, read from the rules text: `sel { key = ... }` blocks and `sel.key = ...`."""
    found: dict[tuple[str, str], int] = {}
    block = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        opened = re.match(r"^(\w+)\s*\{", line)
        if opened:
            block = opened.group(1)
            continue
        if line.startswith("}"):
            block = None
            continue
        dotted = re.match(r"^(\w+)\.(\w+)\s*=", line)
        if dotted and block is None:
            found[(dotted.group(1), dotted.group(2))] = number
        elif block not in (None, "calibrate"):
            for key in re.findall(r"(\w+)\s*=", line):
                found[(block, key)] = number
    return found


def _explain_rows(text: str) -> dict[str, dict[str, re.Match]]:
    rows: dict[str, dict[str, re.Match]] = {}
    node = None
    for line in text.splitlines():
        head = re.match(r"^(seq_blocks_\d) \(", line)
        if head:
            node = head.group(1)
            rows[node] = {}
            continue
        m = EXPLAIN_ROW.match(line)
        if m and node:
            rows[node][m.group(1)] = m
    return rows


def test_explain_names_the_winning_rule_of_every_parameter(mapped) -> None:
    run, config = mapped
    lines = _rule_lines(RECIPE)
    rows = _explain_rows(run.out)
    q = config["passes"]["quantize"]
    assert set(rows) == set(LINEARS) | set(RELUS)
    for node, params in rows.items():
        op = "linear" if node in LINEARS else "relu"
        # every parameter some rule sets for this op is explained, and nothing else
        expected = {p for (sel, p) in lines if sel in ("default", op) and p.split("_")[0] in ("name",) +
                    tuple(t.split("_")[0] for t in OP_TENSORS[op])}
        assert set(params) == expected, node
        for param, m in params.items():
            want = lines.get((op, param), lines.get(("default", param)))
            assert m.group(3).endswith("configs/toy_ternary.tq"), m.group(0)
            assert int(m.group(4)) == want, (node, param)
            assert m.group(5) == (op if (op, param) in lines else "default")
            shown = m.group(2)
            value = q[node]["config"][param]
            assert shown == ('"ternary"' if param == "name" else "true" if value is True else repr(value))


def test_explain_lists_what_a_rule_overrode(tmp_path) -> None:
    rules = tmp_path / "over.tq"
    rules.write_text(
        'profile linear.weight: range_min_max\n'
        'default { name = "ternary"  data_in_width = 32 }\n'
        'linear { weight_width = 2  weight_max = stat.range_min_max.max }\n'
        '"seq_blocks_*" { weight_width = 32 }\n'
        '"seq_blocks_4" { weight_width = 2 }\n'
    )
    out = tmp_path / "q.toml"
    run = run_cli("map", DOC_STATS, "--rules", rules, "-o", out, "--explain")
    assert run.rc == 0, run
    rows = _explain_rows(run.out)
    q = toml.load(out)["passes"]["quantize"]
    assert q["seq_blocks_2"]["config"]["weight_width"] == 32  # the glob beats the type
    assert q["seq_blocks_4"]["config"]["weight_width"] == 2  # the name beats the glob
    m = rows["seq_blocks_4"]["weight_width"]
    assert (m.group(3), int(m.group(4))) == (str(rules), 5)
    assert m.group(6) == f"{rules}:4, {rules}:3"  # best first: the glob, then the type
    m = rows["seq_blocks_2"]["weight_width"]
    assert (int(m.group(4)), m.group(6)) == (4, f"{rules}:3")
    assert rows["seq_blocks_2"]["weight_max"].group(2) == repr(0.099988654255867)


def test_map_writes_nothing_but_the_output(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = run_cli("map", DOC_STATS, "--rules", RECIPE)
    assert run.rc == 0, run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quant_config.toml"]
    assert "wrote quant_config.toml" in run.out


@pytest.mark.parametrize(
    ("stats_text", "needles"),
    [
        ("[seq_blocks_0.common\nmase_op = ", ("not valid TOML",)),
        (None, ("does not exist",)),
    ],
)
def test_bad_statistics_file_is_exit_1(tmp_path, stats_text, needles) -> None:
    stats = tmp_path / "stats.toml"
    if stats_text is not None:
        stats.write_text(stats_text)
    out = tmp_path / "q.toml"
    run = run_cli("map", stats, "--rules", RECIPE, "-o", out)
    assert_one_clean_error(run, str(stats), *needles)
    assert not out.exists()


def test_rule_reading_a_statistic_the_file_lacks_is_exit_1(tmp_path) -> None:
    rules = tmp_path / "var.tq"
    rules.write_text(
        'profile linear.weight: variance_precise\n'
        'default { name = "ternary" }\n'
        'linear { weight_width = 2 }\n'
        'linear.weight_threshold = stat.variance_precise.variance\n'
    )
    run = run_cli("map", DOC_STATS, "--rules", rules, "-o", tmp_path / "q.toml")
    assert_one_clean_error(run, "seq_blocks_0", "weight_threshold", f"{rules}:4", str(DOC_STATS))


def test_unmatched_selector_in_map_names_the_rule_and_the_closest_node(tmp_path) -> None:
    rules = tmp_path / "typo.tq"
    rules.write_text('default { name = "ternary" }\n"seq_blokcs_0" { data_in_width = 32 }\n')
    run = run_cli("map", DOC_STATS, "--rules", rules, "-o", tmp_path / "q.toml")
    assert_one_clean_error(run, f"{rules}:2:", "seq_blokcs_0", "did you mean", "seq_blocks_0")


def test_map_without_rules_uses_the_built_in_recipe(tmp_path, mapped) -> None:
    out = tmp_path / "q.toml"
    run = run_cli("map", DOC_STATS, "-o", out)
    assert run.rc == 0, run
    assert toml.load(out)["passes"] == mapped[1]["passes"]


def test_base_config_keeps_model_and_dataset_like_stat_to_conf(tmp_path: Path) -> None:
    # stat-to-conf.py's --base: the user's base file (the document's toy_ternary_scaled.toml) names the model
    # and dataset; the written config keeps them and still gives every node its own parameters.
    base = MASE_DATA / "toy_ternary_scaled_base.toml"
    out = tmp_path / "q.toml"
    run = run_cli("map", DOC_STATS, "--rules", RECIPE, "--base", base, "-o", out)
    assert run.rc == 0, run.err
    written, base_data = toml.load(out), toml.load(base)
    assert (written["model"], written["dataset"]) == (base_data["model"], base_data["dataset"])
    stats = toml.load(DOC_STATS)
    for node in LINEARS:
        expected = stats[node]["software"]["args"]["weight"]["stat"]["range_min_max"]["max"]
        assert written["passes"]["quantize"][node]["config"]["weight_max"] == expected


def test_missing_base_config_is_one_clean_error(tmp_path: Path) -> None:
    run = run_cli("map", DOC_STATS, "--base", tmp_path / "nope.toml", "-o", tmp_path / "q.toml")
    assert_one_clean_error(run, "nope.toml")
    assert not (tmp_path / "q.toml").exists()
