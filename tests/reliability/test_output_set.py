"""`outputs.write_output_set`: one swap commits every file; what it refuses; the two-rename fallback and its
repair after a crash between the renames."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ternqc.runtime.errors import UserError
from ternqc.runtime.io import outputs
from ternqc.runtime.io.atomic import atomic_write_text


def _writers(tag: str, fail_at: str | None = None):
    def write(name: str):
        def go(path: Path) -> None:
            if name == fail_at:
                raise UserError(f"cannot write {path.name}: No space left on device")
            atomic_write_text(path, f"{tag}:{name}")

        return go

    return [(name, write(name)) for name in ("a.toml", "b.ckpt", "c.json")]


def _read(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_new_set_replaces_the_old_one_whole(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    outputs.write_output_set(out, _writers("old"))
    (out / "notes.txt").write_text("mine")
    written = outputs.write_output_set(out, _writers("new"))
    assert written == [str(out / n) for n in ("a.toml", "b.ckpt", "c.json")]
    assert _read(out) == {
        "a.toml": "new:a.toml",
        "b.ckpt": "new:b.ckpt",
        "c.json": "new:c.json",
        "notes.txt": "mine",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_file_leaves_the_old_set(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outputs.write_output_set(out, _writers("old"))
    with pytest.raises(UserError, match="c.json"):
        outputs.write_output_set(out, _writers("new", fail_at="c.json"))
    assert _read(out) == {"a.toml": "old:a.toml", "b.ckpt": "old:b.ckpt", "c.json": "old:c.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_crash_between_the_two_renames_is_repaired(tmp_path: Path) -> None:
    """The fallback moved the old set aside and died before the new one arrived: the next run puts the old
    set back before it writes."""
    out = tmp_path / "out"
    outputs.write_output_set(out, _writers("old"))
    dead = 2**22 + 12345  # above the default pid_max: no such process
    aside = tmp_path / f".out.{dead}.0badc0de.ternqc-old"
    os.rename(out, aside)
    assert outputs.clean_stale(out) == [aside]
    assert _read(out) == {"a.toml": "old:a.toml", "b.ckpt": "old:b.ckpt", "c.json": "old:c.json"}


@pytest.mark.parametrize("what", ["subfolder", "cwd", "file"])
def test_folders_ternqc_must_not_swap_are_refused(tmp_path: Path, monkeypatch, what: str) -> None:
    out = tmp_path / "out"
    if what == "file":
        out.write_text("a file")
        words = "not a folder"
    else:
        out.mkdir()
        (out / "keep").mkdir()
        (out / "keep" / "x").write_text("x")
        words = "holds keep" if what == "subfolder" else "working folder"
        if what == "cwd":
            (out / "keep").rename(tmp_path / "keep")
            monkeypatch.chdir(out)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=words):
        outputs.write_output_set(out, _writers("new"))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_an_output_that_is_an_input_is_refused(tmp_path: Path) -> None:
    rules = tmp_path / "r.tq"
    rules.write_text("x")
    link = tmp_path / "link.tq"
    os.link(rules, link)
    for out in (rules, link, tmp_path / "." / "r.tq"):
        with pytest.raises(UserError, match="is the rules file"):
            outputs.refuse_overwriting_inputs([("-o", out)], [("the rules file", rules), ("the plan", None)])
    outputs.refuse_overwriting_inputs([("-o", tmp_path / "p.json")], [("the rules file", rules)])


def test_a_linked_output_folder_keeps_its_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    outputs.write_output_set(real, _writers("old"))
    link = tmp_path / "out"
    link.symlink_to(real)
    outputs.write_output_set(link, _writers("new"))
    assert link.is_symlink() and _read(real)["a.toml"] == "new:a.toml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]
