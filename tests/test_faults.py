"""Faults that need a real process: kill -9 at several moments of export, init and validate; a full disk (a
file-size limit, so writes fail with EFBIG as they would with ENOSPC); two exports to one path at once; the
swap protocol without ``renameat2``. After each, the previous artifact or checkpoint must still open and no
temporary tree may survive the next write."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zaya_export.output_dir import writing
from zaya_export.runtime.artifact import open_artifact

CLI = [sys.executable, "-m", "zaya_export.cli"]


def _cli(*args: object, env: dict | None = None, limit_fsize: int | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    def limits() -> None:
        if limit_fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, preexec_fn=limits)


def _kill_after(seconds: float, *args: object) -> None:
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _hidden(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("faults")
    ckpt, art = base / "ckpt", base / "art"
    assert _cli("init", "--preset", "tiny", ckpt).returncode == 0
    result = _cli("export", ckpt, "-o", art, "--tidar", "off")
    assert result.returncode == 0, result.stderr
    return ckpt, art


@pytest.mark.parametrize("seconds", [1.0, 4.0, 8.0])
def test_kill_during_export_force_keeps_the_old_artifact(made, tmp_path, seconds):
    ckpt, art0 = made
    art = tmp_path / "art"
    shutil.copytree(art0, art)
    _kill_after(seconds, "export", ckpt, "-o", art, "--tidar", "off", "--force")
    open_artifact(art)  # the old one, or the new one if it finished: never neither
    result = _cli("export", ckpt, "-o", art, "--tidar", "off", "--force")
    assert result.returncode == 0, result.stderr
    assert _hidden(tmp_path, "art") == []  # the killed writer's temp tree and lock are gone
    open_artifact(art)


@pytest.mark.parametrize("seconds", [0.5, 3.0])
def test_kill_during_init_force_keeps_a_whole_checkpoint(tmp_path, seconds):
    ck = tmp_path / "ck"
    assert _cli("init", "--preset", "tiny", ck).returncode == 0
    _kill_after(seconds, "init", "--preset", "tiny", "--seed", "1", "--force", ck)
    result = _cli("run", ck, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert _cli("init", "--preset", "tiny", "--force", ck).returncode == 0
    assert _hidden(tmp_path, "ck") == []


@pytest.mark.parametrize("seconds", [1.0, 5.0])
def test_kill_during_validate_leaves_the_artifact_valid(made, tmp_path, seconds):
    art = tmp_path / "art"
    shutil.copytree(made[1], art)
    _kill_after(seconds, "validate", art)
    open_artifact(art)
    result = _cli("validate", art)
    assert result.returncode == 0, result.stderr
    assert not [p for p in art.iterdir() if p.name.startswith(".manifest")]  # a killed run's temp file is gone
    assert open_artifact(art).manifest.validation


def test_validate_never_blesses_a_change_made_after_export(made, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(made[1], art)
    with (art / "generation_config.json").open("a") as f:
        f.write(" ")
    result = _cli("validate", art)
    assert result.returncode == 2 and "sha256 does not match" in result.stderr
    result = _cli("run", art, "--prompt-ids", "1", "--max-new-tokens", "1")
    assert result.returncode == 2  # still refused: validate did not re-hash the edited file


def test_validate_on_a_read_only_artifact_still_gives_its_verdict(made, tmp_path, monkeypatch):
    """A read-only filesystem (simulated: root ignores file modes, and a file-size limit also breaks the
    libraries' own temp files): the verdict is printed and kept in the exit code, only the stored copy is lost."""
    import errno

    from click.testing import CliRunner

    import zaya_export.validate as validate
    from zaya_export.cli import main

    def read_only(*_args: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "art" / "report"))

    art = tmp_path / "art"
    shutil.copytree(made[1], art)
    monkeypatch.setattr(validate, "write_report", read_only)
    result = CliRunner().invoke(main, ["validate", str(art)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "the report was not stored (Read-only file system)" in result.stderr
    open_artifact(art)


def test_full_disk_during_export_leaves_the_old_artifact(made, tmp_path):
    ckpt, art0 = made
    art = tmp_path / "art"
    shutil.copytree(art0, art)
    before = sorted(p.name for p in (art / "onnx").iterdir())
    result = _cli("export", ckpt, "-o", art, "--tidar", "off", "--force", limit_fsize=200_000)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "File too large" in lines[0] or "No space" in lines[0]
    assert sorted(p.name for p in (art / "onnx").iterdir()) == before
    open_artifact(art)
    assert _hidden(tmp_path, "art") == []


def test_full_disk_during_init(tmp_path):
    result = _cli("init", "--preset", "tiny", tmp_path / "ck", limit_fsize=10_000)
    assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
    assert not (tmp_path / "ck").exists() and _hidden(tmp_path, "ck") == []


def test_two_exports_to_one_path_one_loses_cleanly(made, tmp_path):
    ckpt = made[0]
    out = tmp_path / "art"
    first = subprocess.Popen([*CLI, "export", str(ckpt), "-o", str(out), "--tidar", "off"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)  # well inside the first export, which holds the lock
    second = _cli("export", ckpt, "-o", out, "--tidar", "off", "--force")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "another zaya-export is writing" in second.stderr, second.stderr
    open_artifact(out)
    assert _hidden(tmp_path, "art") == []


def test_swap_without_rename_exchange_and_recovery(tmp_path, monkeypatch):
    """The fallback protocol: old tree aside, new tree in, old removed; a writer cut between the two renames
    left ``.<name>.old-*`` and no ``out``: the next writer puts the old tree back before anything else."""
    monkeypatch.setenv("ZAYA_EXPORT_NO_RENAME_EXCHANGE", "1")
    out = tmp_path / "ck"
    with writing(out, False, "checkpoint") as tmp:
        (tmp / ".zaya-export").write_text("{}")
        (tmp / "v").write_text("1")
    with writing(out, True, "checkpoint") as tmp:
        (tmp / ".zaya-export").write_text("{}")
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2" and _hidden(tmp_path, "ck") == []
    os.replace(out, tmp_path / ".ck.old-crashed")  # the state a kill between the two renames leaves
    (tmp_path / ".ck.tmp-crashed").mkdir()
    with pytest.raises(RuntimeError):
        with writing(out, True, "checkpoint"):
            assert (out / "v").read_text() == "2"  # restored before the new tree is even built
            raise RuntimeError("interrupted")
    assert (out / "v").read_text() == "2" and _hidden(tmp_path, "ck") == []
