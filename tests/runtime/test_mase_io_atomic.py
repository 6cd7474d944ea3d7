"""Atomic writes: a file is written whole or not at all; a failure leaves no temporary file behind."""

from __future__ import annotations

import os

import pytest

from ternqc.runtime.calibrate.table import ModuleStats
from ternqc.runtime.errors import UserError
from ternqc.runtime.io import atomic
from ternqc.runtime.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from ternqc.runtime.io.mase_io import write_stats_toml


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_text_and_bytes_and_creates_folders(tmp_path):
    atomic_write_text(tmp_path / "a" / "b" / "x.txt", "héllo\n")
    assert (tmp_path / "a" / "b" / "x.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(tmp_path / "y.bin", b"\x00\x01")
    assert (tmp_path / "y.bin").read_bytes() == b"\x00\x01"
    assert files(tmp_path) == ["a", "y.bin"]


def test_replaces_an_existing_file_with_normal_permissions(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
                f.flush()
                raise RuntimeError("boom")
    assert target.read_text() == "old content"
    assert files(tmp_path) == ["x.txt"]


def test_failure_before_anything_exists_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "new.ckpt") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert files(tmp_path) == []


def test_os_failure_during_write_is_a_user_error_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(UserError, match=r"cannot write .*x.txt: No space left on device"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert files(tmp_path) == ["x.txt"]


def test_failed_rename_is_a_user_error_and_cleans_up(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(UserError, match="Permission denied"):
        atomic_write_text(tmp_path / "x.txt", "new")
    assert files(tmp_path) == []


def test_a_folder_in_the_way(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        atomic_write_text(tmp_path / "out", "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create its folder"):
        atomic_write_text(tmp_path / "file" / "x.txt", "x")


def test_a_writer_failing_mid_file_leaves_the_previous_statistics(tmp_path, monkeypatch):
    target = tmp_path / "stats.toml"
    table = {"fc": ModuleStats("fc", "fc", "linear", values={"weight": {"range_min_max": {"max": 1.0}}})}
    write_stats_toml(target, table)
    before = target.read_bytes()
    real_open = open

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(5, "Input/output error")

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Failing(real_open(p, mode, *a, **k))
                        if "x" in mode else real_open(p, mode, *a, **k))
    with pytest.raises(UserError, match="Input/output error"):
        write_stats_toml(target, {"other": ModuleStats("other", "other", "relu")})
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert files(tmp_path) == ["stats.toml"]
