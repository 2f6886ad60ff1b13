"""Hostile files where data enters: image folders (FIFOs, huge and wide images, one class, bad folder names),
edge model files (lying headers, shapes, dtypes, member counts), class names, and output paths — each probe of
the hardening round answered by a one-line error (exit 2) or done right, and hypothesis suites over both kinds
of file."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from edgeff.cli.app import app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from edgeff.config import LayerSpec, ModelConfig
from edgeff.data import load_folder, load_pixels
from edgeff.edge.store import read_arrays
from edgeff.errors import CheckpointError, InputError
from edgeff.images import read_image, set_max_pixels
from edgeff.names import MAX_NAME, name_problem

runner = CliRunner()


def _one_line_refusal(res, *needles: str) -> None:  # type: ignore[no-untyped-def]
    text = res.output.strip()
    assert res.exit_code == 2, res.output
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for n in needles:
        assert n in text, text


def _folder(root: Path, classes: dict[str, list[np.ndarray]]) -> Path:
    for name, imgs in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(root / name / f"{i:03d}.png")
    return root


def _digits(k: int, value: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(value)
    return [rng.integers(0, 255, (28, 28), dtype=np.uint8) for _ in range(k)]


def _within(seconds: float, fn):  # type: ignore[no-untyped-def]
    """``fn()`` in a daemon thread: its result or exception, or a failure if it is still running (a hang)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: it hangs"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


# ----------------------------------------------------------------------------- image folders
def test_a_fifo_named_like_an_image_is_skipped_in_a_folder_and_refused_by_name(tmp_path: Path) -> None:
    """Before: `mkfifo DIR/cat/x.png; edgeff train --data DIR` never returned (open() waits for a writer)."""
    root = _folder(tmp_path / "d", {"cat": _digits(3), "dog": _digits(3, 1)})
    os.mkfifo(root / "cat" / "x.png")
    ds = _within(20, lambda: load_folder(root, (1, 28, 28)))
    assert len(ds.y_train) + len(ds.y_test) == 6
    with pytest.raises(InputError, match="not a regular file"):
        _within(20, lambda: read_image(root / "cat" / "x.png", (1, 28, 28)))
    res = _within(60, lambda: runner.invoke(app, ["predict", str(tmp_path / "missing.pt"), str(root / "cat" / "x.png")]))
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_an_image_above_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """Before: a 688 KB PNG of 13300x13300 was decoded (1.4 GB, 20 s) with a warning. Here a 1-bit image of
    6000x6000 (4.5 MB decoded as 1 bit, 36 MB as the grey image a model reads) against a 30-megapixel limit."""
    path = tmp_path / "big.png"
    Image.new("1", (6000, 6000)).save(path)
    set_max_pixels(30_000_000)
    try:
        tracemalloc.start()
        with pytest.raises(InputError, match=r"6000x6000 \(36.0 megapixels\), above the 30-megapixel limit.*--max-pixels"):
            read_image(path, (1, 28, 28))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 << 20, peak  # the header was read, not the pixels
        set_max_pixels(40_000_000)
        assert read_image(path, (1, 28, 28)).shape == (1, 28, 28)  # the limit raised, it is read
    finally:
        set_max_pixels(40_000_000)
    root = _folder(tmp_path / "d", {"a": _digits(2), "b": _digits(2, 1)})
    Image.new("1", (600, 600)).save(root / "a" / "big.png")
    res = runner.invoke(app, ["train", "--data", str(root), "--max-pixels", "100000", "--out", str(tmp_path / "m.pt")])
    _one_line_refusal(res, "above the 0.1-megapixel limit")


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """Before: convert("L") clipped 16-bit values at 255, so two classes differing only in brightness (here
    2,000 vs 30,000 of 65,535) read as identical white images."""
    dim, bright = np.full((28, 28), 2000, np.uint16), np.full((28, 28), 30000, np.uint16)
    root = tmp_path / "d"
    for name, a in (("dim", dim), ("bright", bright)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(a).save(root / name / f"{i}.png")
    assert Image.open(root / "dim" / "0.png").mode == "I;16"
    ds = load_folder(root, (1, 28, 28))
    by_class = {ds.classes[k]: np.unique(ds.x_train[ds.y_train == k]) for k in range(2)}
    assert by_class == {"dim": [round(2000 / 257)], "bright": [round(30000 / 257)]}
    assert load_pixels(root / "bright", (3, 28, 28)).max() == round(30000 / 257)  # and to RGB
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "half.tiff")
    assert np.unique(read_image(tmp_path / "half.tiff", (1, 8, 8))).tolist() == [128]
    Image.fromarray(np.full((8, 8), 7.5, np.float32)).save(tmp_path / "hot.tiff")
    with pytest.raises(InputError, match="values above 1"):
        read_image(tmp_path / "hot.tiff", (1, 8, 8))


def test_a_folder_needs_two_classes_with_valid_names(tmp_path: Path) -> None:
    """Before: a one-class folder ended in `RuntimeError: random_ expects 'from' to be less than 'to'`."""
    root = _folder(tmp_path / "one", {"cat": _digits(4)})
    with pytest.raises(InputError, match="one class folder"):
        load_folder(root, (1, 28, 28))
    res = runner.invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "m.pt")])
    _one_line_refusal(res, "at least 2 classes")
    bad = _folder(tmp_path / "long", {"a": _digits(2), "b" * (MAX_NAME + 1): _digits(2)})
    with pytest.raises(InputError, match=f"at most {MAX_NAME} characters"):
        load_folder(bad, (1, 28, 28))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["png", "png16", "jpeg", "gif", "tiff-f", "tiff-i", "truncated", "junk", "empty", "fifo",
                             "dir", "symlink-dev", "rgba", "palette", "cmyk", "one-bit"]),
       size=st.integers(1, 300), name=st.sampled_from(["x.png", "X.PNG", "a b.jpg", ".hidden.png", "é.webp", "n.gif"]),
       seed=st.integers(0, 2**16))
def test_image_files_of_every_kind_are_read_or_refused_in_one_line(tmp_path_factory, kind, size, name, seed) -> None:
    """Any file in a class folder is read to (1, 28, 28) uint8, skipped (not a regular file), or refused with
    an ``InputError`` naming it — never a hang, a traceback of another type, or a clipped wide image."""
    tmp = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(seed)
    path = tmp / name
    if kind == "png":
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path, format="PNG")
    elif kind == "png16":
        Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16)).save(path, format="PNG")
    elif kind == "jpeg":
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format="JPEG")
    elif kind == "gif":
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path, format="GIF")
    elif kind == "tiff-f":
        Image.fromarray(rng.random((size, size), dtype=np.float32) * (2 if seed % 2 else 1)).save(path, format="TIFF")
    elif kind == "tiff-i":
        Image.fromarray(rng.integers(0, 2**31 - 1, (size, size), dtype=np.int32)).save(path, format="TIFF")
    elif kind == "truncated":
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path, format="PNG")
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif kind == "junk":
        path.write_bytes(rng.bytes(size))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink-dev":
        path.symlink_to("/dev/zero")
    elif kind == "rgba":
        Image.fromarray(rng.integers(0, 255, (size, size, 4), dtype=np.uint8), "RGBA").save(path, format="PNG")
    elif kind == "palette":
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).convert("P").save(path, format="PNG")
    elif kind == "cmyk":
        Image.fromarray(rng.integers(0, 255, (size, size, 4), dtype=np.uint8), "CMYK").save(path, format="JPEG")
    else:
        Image.fromarray(rng.integers(0, 2, (size, size), dtype=np.uint8) * 255).convert("1").save(path, format="PNG")
    try:
        arr = _within(30, lambda: load_pixels(tmp, (1, 28, 28)))
    except InputError as e:
        assert "\n" not in str(e) and (name in str(e) or "regular file" in str(e) or "float image" in str(e)), e
        return
    except FileNotFoundError as e:  # nothing readable: not a regular image file in the folder
        assert kind in ("fifo", "dir", "symlink-dev"), (kind, e)
        return
    assert arr.shape == (1, 1, 28, 28) and arr.dtype == np.uint8
    if kind == "png16" and size >= 28:  # scaled by 257, not clipped at 255
        assert arr.max() < 255 or (arr == 255).mean() < 0.5


# ----------------------------------------------------------------------------- edge model files
@pytest.fixture(scope="module")
def edge_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeff.edge import make_edge_learner
    from edgeff.edge.store import save
    from edgeff.presets import get_preset

    p = get_preset("symba-mlp")
    path = tmp_path_factory.mktemp("edge") / "m.npz"
    save(make_edge_learner(p), path, meta={"preset": "symba-mlp", "data": "builtin"})
    return path


def _rewrite(src: Path, dst: Path, change) -> Path:  # type: ignore[no-untyped-def]
    """Copy an edge file, letting ``change(name, raw_bytes) -> (name, raw_bytes) | None`` rewrite members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            item = change(info.filename, zin.read(info))
            if item is not None:
                zout.writestr(item[0], item[1])
    return dst


def _npy(a: np.ndarray, shape: tuple[int, ...] | None = None, descr: str | None = None) -> bytes:
    import io

    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(a)
    if shape is not None:
        header["shape"] = shape
    if descr is not None:
        header["descr"] = descr
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + a.tobytes()


def _header_with(path: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    def change(name: str, raw: bytes):  # type: ignore[no-untyped-def]
        if name != "header.npy":
            return name, raw
        import io

        head = json.loads(np.load(io.BytesIO(raw)).tobytes().decode())
        edit(head)
        return name, _npy(np.frombuffer(json.dumps(head).encode(), np.uint8))

    return _rewrite(path, dst, change)


def test_an_edge_file_that_lies_is_refused_before_anything_is_allocated(edge_file: Path, tmp_path: Path,
                                                                        edge_cli) -> None:  # type: ignore[no-untyped-def]
    """Before: a member declaring (10^6, 10^6) ended in `_ArrayMemoryError` (rc 1); a header with out=20000
    allocated 1.77 GB before its refusal."""
    huge = _rewrite(edge_file, tmp_path / "huge.npz", lambda n, raw: (n, _npy(np.zeros(4, np.float32), (10**6, 10**6)))
                    if n.startswith("t:layers.0") and n.endswith("weight.npy") else (n, raw))

    def wide(head: dict) -> None:
        head["model"]["layers"][0]["out"] = 20000

    widened = _header_with(edge_file, tmp_path / "wide.npz", wide)
    for bad, why in ((huge, "declares"), (widened, "header describes a model of")):
        tracemalloc.start()
        with pytest.raises(CheckpointError, match=why):
            read_arrays(bad)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 64 << 20, peak
        res = edge_cli(["eval", str(bad)])
        _one_line_refusal(res, why)


def test_a_torch_checkpoint_given_to_the_edge_runtime_says_convert_it_first(tmp_path: Path, edge_cli) -> None:  # type: ignore[no-untyped-def]
    import torch

    torch.save({"state": torch.zeros(3)}, tmp_path / "m.pt")
    res = edge_cli(["eval", str(tmp_path / "m.pt")])
    _one_line_refusal(res, "torch checkpoint", "edgeff-edge convert")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=st.sampled_from(["shape", "dtype", "drop", "extra", "many", "header-json", "header-type", "names",
                                 "truncate", "out", "kind"]),
       seed=st.integers(0, 2**16))
def test_mutated_edge_files_load_or_are_refused_in_one_line(edge_file: Path, tmp_path_factory, mutation, seed) -> None:
    """Mutated headers, shapes, dtypes and member counts: ``CheckpointError`` (or ``InputError`` for a config
    the product refuses), never another exception, and never more memory than the honest file needs."""
    from edgeff.edge import load

    rng = np.random.default_rng(seed)
    dst = tmp_path_factory.mktemp("mut") / "m.npz"
    names = zipfile.ZipFile(edge_file).namelist()
    target = names[int(rng.integers(len(names)))]
    if mutation == "shape":
        _rewrite(edge_file, dst, lambda n, raw: (n, _npy(np.zeros(3, np.float32), (int(rng.integers(0, 10**9)), 7)))
                 if n == target else (n, raw))
    elif mutation == "dtype":
        descr = ["|O", "<c16", "<U8", "|V4", ">f8"][int(rng.integers(5))]
        _rewrite(edge_file, dst, lambda n, raw: (n, _npy(np.zeros(8, np.uint8), (1,), descr)) if n == target else (n, raw))
    elif mutation == "drop":
        _rewrite(edge_file, dst, lambda n, raw: None if n == target else (n, raw))
    elif mutation in ("extra", "many"):
        count = 1 if mutation == "extra" else 5000
        with zipfile.ZipFile(dst, "w") as z:
            with zipfile.ZipFile(edge_file) as zin:
                for info in zin.infolist():
                    z.writestr(info.filename, zin.read(info))
            for i in range(count):
                z.writestr(f"junk{i}.npy", _npy(np.zeros(0, np.float32)))
    elif mutation == "truncate":
        raw = edge_file.read_bytes()
        dst.write_bytes(raw[: int(rng.integers(0, len(raw)))])
    else:
        def edit(head: dict) -> None:
            if mutation == "header-json":
                head["model"] = "x" * int(rng.integers(0, 100))
            elif mutation == "header-type":
                head["model"]["layers"] = 7
            elif mutation == "names":
                head["model"]["class_names"] = [["a", ["b"]]] * head["model"]["num_classes"]
            elif mutation == "out":
                head["model"]["layers"][int(rng.integers(len(head["model"]["layers"])))]["out"] = int(rng.integers(1, 10**6))
            else:
                head["model"]["layers"][0]["kind"] = ["vit", "lstm", 3][int(rng.integers(3))]

        _header_with(edge_file, dst, edit)
    tracemalloc.start()
    try:
        load(dst)
    except (CheckpointError, InputError) as e:
        assert "\n" not in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 256 << 20, (mutation, peak)


# ----------------------------------------------------------------------------- names and output paths
@pytest.mark.parametrize("bad", ["a\nb", "x" * 10_000, "", "   ", "tab\there", ["a"], 7, None, {"a": 1}])
def test_one_rule_for_class_names_in_the_api_configs_and_the_device(bad: object) -> None:
    from edgeff.firmware_sim.device import DeviceError, _class_name

    assert name_problem(bad) is not None
    base = ModelConfig(layers=(LayerSpec("linear", 4),))
    with pytest.raises(InputError):
        base.with_class(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        ModelConfig(layers=base.layers, num_classes=2, class_names=("ok", bad))  # type: ignore[arg-type]
    with pytest.raises(DeviceError):
        _class_name(bad)


def test_add_class_refuses_a_bad_name_in_one_line(tmp_path: Path) -> None:
    """Before: a name with a newline or of 10,000 characters was accepted and split `predict`'s lines."""
    for bad in ("two\nlines", "x" * 10_000):
        res = runner.invoke(app, ["add-class", str(tmp_path / "missing.pt"), "--name", bad])
        _one_line_refusal(res, "class name")


@pytest.mark.parametrize("cli", ["edge", "torch"])
def test_output_paths_are_checked_before_any_work(cli: str, tmp_path: Path, edge_cli) -> None:  # type: ignore[no-untyped-def]
    """Before: `edgeff-edge train --out FILE/m.npz` trained and evaluated, then died with a FileExistsError
    traceback; `--out m.txt` wrote an npz silently."""
    (tmp_path / "FILE").write_text("a file")
    invoke, suffix = (edge_cli, ".npz") if cli == "edge" else ((lambda args: runner.invoke(app, args)), ".pt")
    base = ["train", "--preset", "symba-mlp", "--samples", "100000", "--epochs", "50"]  # hours, if it started
    res = _within(60, lambda: invoke([*base, "--out", str(tmp_path / "FILE" / f"m{suffix}")]))
    _one_line_refusal(res, "is a file, not a folder")
    res = invoke([*base, "--out", str(tmp_path / "m.txt")])
    _one_line_refusal(res, f"name it m{suffix}")
    res = invoke([*base, "--out", str(tmp_path)])
    _one_line_refusal(res, "is a folder")
