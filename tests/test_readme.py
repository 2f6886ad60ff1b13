"""The README runs as written: its Python blocks, in order, in one namespace (as a reader pastes them),
and its command lines that need no external data (no ``--data-dir``, no device port, no server)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.DOTALL)
# lines left out, and why: external data or a user's files, a device or a server, installs, the suite itself
NEEDS_MORE = ("--data-dir", "--port", "device-sim", "pip ", "python3 -m venv", "torchrun", "pytest", "pipeline")
# training lines run as written plus a shorter run (the same command on 200 samples, one epoch): the
# README's `edgeff train` is the 20-epoch main job, minutes on a CPU
SHORTEN = ("--samples", "200", "--epochs", "1")


def cli_lines() -> list[str]:
    lines = []
    for lang, body in BLOCKS:
        if lang == "python":
            continue
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            command = line.startswith(("edgeff ", "edgeff-edge ")) or line in ("edgeff", "edgeff-edge")
            if command and not any(m in line for m in NEEDS_MORE):
                lines.append(line)
    return lines


def test_the_python_blocks_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = [body for lang, body in BLOCKS if lang == "python"]
    assert len(code) >= 6
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, body in enumerate(code):
        try:
            exec(compile(body, f"README python block {i + 1}", "exec"), namespace)  # noqa: S102 - our own README
        except Exception as e:
            raise AssertionError(f"README python block {i + 1} fails: {type(e).__name__}: {e}\n{body}") from e


def _cups(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"cup{i}.png")


def test_the_command_lines_run(tmp_path: Path) -> None:
    lines = cli_lines()
    assert "edgeff train" in lines and any(line.startswith("edgeff add-class") for line in lines)
    bindir = Path(sys.executable).parent
    _cups(tmp_path / "cups")
    # what the add-class line expects to find: a trained cfl-mlp checkpoint
    setup = [str(bindir / "edgeff"), "train", "--preset", "cfl-mlp", "--no-progress", *SHORTEN]
    subprocess.run(setup, cwd=tmp_path, check=True, capture_output=True, timeout=600)
    for line in lines:
        argv = shlex.split(line)
        argv[0] = str(bindir / argv[0])
        if argv[1] == "train":
            argv += [*SHORTEN, "--no-progress"]
        if argv[1] == "continual":
            argv += ["--no-progress"]
        res = subprocess.run(argv, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"`{line}` failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
