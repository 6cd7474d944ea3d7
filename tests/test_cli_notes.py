"""Notes on stderr about profile rules that found nothing: said for a rule naming what the model lacks, not
for a recipe's rules about a quantisable type the model simply does not use."""

from __future__ import annotations

from pathlib import Path

from tests.test_cli_support import run_cli


def test_unmatched_profile_rules(tmp_path: Path) -> None:
    rules = tmp_path / "r.tq"
    rules.write_text(
        "profile linear.weight: range_min_max(dims = all)\n"
        "profile conv2d.weight: range_min_max(dims = all)\n"      # toy has no conv: a recipe's generality
        'profile "seq_blocks.9".data_in: abs_mean(dims = all)\n'  # a module toy does not have
    )
    run = run_cli("profile", "--rules", rules, "--out", tmp_path / "s.toml", "--no-progress")
    assert run.rc == 0, run.err
    notes = [line for line in run.err.splitlines() if "matched no module" in line]
    assert len(notes) == 1 and f"{rules}:3:9" in notes[0] and "seq_blocks.9" in notes[0]
