"""README.md and docs/ as a newcomer meets them: every results table equals what its records render, the
README stays short, no measured figure without its record, and every command and Python block runs as written
(in order, one namespace and one folder per page), except those that need the full data sets or hardware,
which are skipped with the reason."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import docs  # tools/docs.py: the tables' renderer

PAGES = {p.relative_to(ROOT).as_posix(): p for p in docs.PAGES}
# lines left out of the run, and why
NEEDS_MORE = {
    "--data-dir": "needs the full data sets (--data-dir)",
    "--port": "needs a device on a serial port",
    "device-sim": "starts a device server",
    "torchrun": "needs torchrun (tests/test_pipeline.py runs 2-rank jobs)",
    "pip ": "installs packages",
    "python3 -m venv": "creates a virtual environment",
    "pytest": "the suite itself",
    "--edge ": "needs a device",
}
# a training line runs as written plus a shorter run (the same command on 200 samples, one epoch): the documented
# commands are the full jobs, minutes each on a CPU
SHORTEN = ("--samples", "200", "--epochs", "1")
FIGURE = re.compile(r"(?<![\w.])(\d{1,3}\.\d{1,2})%")


def blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", text, re.DOTALL)


def command_lines(text: str) -> list[str]:
    lines = []
    for lang, body in blocks(text):
        if lang == "python":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(("edgeff ", "edgeff-edge ", "torchrun ")) or line in ("edgeff", "edgeff-edge"):
                lines.append(line)
    return lines


def skip_reason(line: str) -> str | None:
    return next((why for marker, why in NEEDS_MORE.items() if marker in line.split("  #")[0]), None)


def plan(text: str) -> list[tuple[str, str | None]]:
    """A page's command lines in order, each with why it is skipped (None: it runs); a line that reads what a
    skipped line writes is skipped too."""
    out, missing = [], set()
    for line in command_lines(text):
        why = skip_reason(line)
        command = line.split("  #")[0]
        if why is None and any(path in command.split() for path in missing):
            why = "reads the output of a command skipped above"
        if why is not None and (path := written(line)):
            missing.add(path)
        out.append((line, why))
    return out


def written(line: str) -> str | None:
    """The file a documented command writes, where it writes one (its default included)."""
    argv = shlex.split(line.split("  #")[0])
    opt = lambda name: argv[argv.index(name) + 1] if name in argv else None
    if argv[0] in ("edgeff", "edgeff-edge") and len(argv) > 1 and argv[1] == "train" or argv[0] == "torchrun":
        ext = ".npz" if argv[0] == "edgeff-edge" else ".pt"
        twin = "-bp" if "--backprop" in argv else ""
        out = opt("--out") or f"runs/{opt('--preset') or 'symba-mlp'}{twin}{ext}"
        return out[: -len(ext)] + ".pipeline.pt" if "--pipeline" in argv else out  # the ranks' merged model
    if len(argv) > 2 and argv[1] == "add-class" and argv[0] == "edgeff":
        return opt("--out") or str(Path(argv[2]).with_name(f"{Path(argv[2]).stem}-{opt('--name')}.pt"))
    if len(argv) > 1 and argv[1] == "export":
        return opt("--out")
    if len(argv) > 3 and argv[1] == "convert":
        return argv[3]
    return None


@pytest.mark.parametrize("page", list(PAGES))
def test_tables_equal_what_their_records_render(page: str) -> None:
    text = PAGES[page].read_text()
    assert text == docs.render(text), f"{page}: a table differs from bench/results; run `python tools/docs.py`"


def test_readme_is_short_and_links_every_page() -> None:
    text = PAGES["README.md"].read_text()
    assert len(text.splitlines()) <= 200
    for page in PAGES:
        if page.startswith("docs/"):
            assert f"({page})" in text, f"README does not link {page}"


def test_preset_notes_carry_no_measured_figure() -> None:
    """A preset's measured figures come from the records (docs/presets.md); its notes may quote its paper."""
    from edgeff.presets import PRESETS

    for p in PRESETS.values():
        for sentence in re.split(r"(?<=[.;])\s", p.notes):
            if FIGURE.search(sentence):
                assert re.search(r"paper|report", sentence), f"{p.name}: a measured figure in its notes: {sentence!r}"


def _recorded() -> set[str]:
    values: set[str] = set()

    def walk(v: object) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, float) and 0 <= v <= 1:
            values.add(f"{100 * v:.2f}")
            values.add(f"{100 * v:.1f}")

    for path in docs.RESULTS.glob("*.json"):
        walk(json.loads(path.read_text()))
    return values


@pytest.mark.parametrize("page", list(PAGES))
def test_figures_in_prose_come_from_records(page: str) -> None:
    """Outside the generated tables and code, a percentage is a recorded figure or a paper's."""
    text = docs.BLOCK.sub("", PAGES[page].read_text())
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    recorded = _recorded()
    for sentence in re.split(r"(?<=[.;:])\s", text):
        for figure in FIGURE.findall(sentence):
            assert figure in recorded or re.search(r"paper|report", sentence), \
                f"{page}: {figure}% has no record in bench/results: {sentence.strip()!r}"


@pytest.mark.parametrize("page", list(PAGES))
def test_commands_never_overwrite_an_earlier_output(page: str) -> None:
    seen: dict[str, str] = {}
    for line in command_lines(PAGES[page].read_text()):
        path = written(line)
        allowed = "--resume" in line or "--in-place" in line or "overwrite" in line
        if path is not None and not allowed:
            assert path not in seen, f"{page}: `{line}` overwrites what `{seen[path]}` wrote"
            seen[path] = line


def _cups(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"cup{i}.png")


def _python_pages() -> list[str]:
    return [p for p in PAGES if any(lang == "python" for lang, _ in blocks(PAGES[p].read_text()))]


@pytest.mark.parametrize("page", _python_pages())
def test_python_blocks_run_in_order(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    code = [body for lang, body in blocks(PAGES[page].read_text()) if lang == "python"]
    for i, body in enumerate(code):
        try:
            exec(compile(body, f"{page} python block {i + 1}", "exec"), namespace)  # noqa: S102 - our own docs
        except Exception as e:
            raise AssertionError(f"{page} python block {i + 1} fails: {type(e).__name__}: {e}\n{body}") from e


def _skipped() -> list[tuple[str, str, str]]:
    return [(page, line, why) for page, path in PAGES.items() for line, why in plan(path.read_text()) if why]


@pytest.mark.parametrize(("page", "line", "why"), _skipped())
def test_commands_that_need_more(page: str, line: str, why: str) -> None:
    pytest.skip(f"{why}: `{line}`")


@pytest.mark.parametrize("page", [p for p in PAGES if any(why is None for _, why in plan(PAGES[p].read_text()))])
def test_command_lines_run(page: str, tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    _cups(tmp_path / "cups")
    for line, why in plan(PAGES[page].read_text()):
        if why:
            continue
        argv = shlex.split(line.split("  #")[0])
        argv[0] = str(bindir / argv[0])
        if argv[1] == "train":
            argv += [*SHORTEN, "--no-progress"]
        if argv[1] == "continual":
            argv += ["--no-progress"]
        res = subprocess.run(argv, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{page}: `{line}` failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
