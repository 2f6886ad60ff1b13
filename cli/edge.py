"""``edgeff-edge``: the commands a board without torch needs, on the standard library's argparse.

train / continue training, evaluate (edge models and ONNX files), list what the edge runtime trains,
convert torch checkpoints (on a machine with torch), and run the simulated device. A command imports what
it uses: no torch but in ``convert``, no typer, rich or pydantic but in ``device-sim`` (typer's dispatch
alone costs an edge process ~15 MiB). ``train`` takes its options from ``edgeff.options.TRAIN``, the
declarations ``edgeff train`` is built from, so both spell, type and default them alike.

``main(argv)`` returns the exit status (0, or 2 for a user's mistake, said in one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from edgeff.options import Opt, options

PROG = "edgeff-edge"


class UserError(Exception):
    """A mistake the user can fix, said in one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UserError(f"{message} (see {self.prog} --help)")


def add_options(parser: argparse.ArgumentParser, table: tuple[Opt, ...]) -> None:
    """``table``'s options on an argparse parser (the typer side is ``edgeff.cli.common.declared``)."""
    for o in table:
        if o.type is bool:
            parser.add_argument(o.spelling, dest=o.name, action="store_true", default=o.default, help=o.help)
            if o.negatable:
                parser.add_argument(o.off_spelling, dest=o.name, action="store_false", help=f"not {o.spelling}")
        else:
            parser.add_argument(o.spelling, dest=o.name, type=o.type, default=o.default, help=o.help,
                                metavar=o.name.upper())


def _user_errors() -> tuple[type[Exception], ...]:
    from edgeff.errors import EdgeFFError

    return (EdgeFFError, FileNotFoundError, ValueError, UserError)


class Progress:
    """One line on a terminal's stderr, redrawn at most every 0.2 s: done/total, elapsed, remaining, each layer's loss."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.done = label, max(1, total), 0
        self.enabled = enabled and sys.stderr.isatty()  # a log file gets the result lines only
        self.t0 = self.shown = time.perf_counter()

    def advance(self, n: int, text: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.shown >= 0.2 or self.done >= self.total):
            self.shown = now
            left = (now - self.t0) * (self.total - self.done) / max(1, self.done)
            sys.stderr.write(f"\r{self.label} {self.done}/{self.total} {now - self.t0:5.1f}s, {left:5.1f}s left {text}"
                             "\x1b[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")


def train(a: argparse.Namespace) -> None:
    """Train a preset with numpy alone, streaming batches from disk, then report test accuracy."""
    from edgeff.edge.run import train_run
    from edgeff.spec import RunOptions

    spec = RunOptions(**{o.name: getattr(a, o.name) for o in options("edge") if o.name not in ("out_path", "progress")},
                      out=a.out_path)
    bar: list[Progress] = []

    def on_start(learner: Any, total: int) -> None:
        if learner.train_cfg.batch_size == 1 and learner.samples_seen == 0:  # a new stream: its recipe, said
            from edgeff.families import family_for
            from edgeff.presets import get_preset, stream_line

            print(stream_line(learner.train_cfg, dict(get_preset(a.preset).stream_model),
                              closed_form="lr" in family_for(learner.model_cfg).core_unused))
        bar.append(Progress("train", total, a.progress))

    def on_step(metrics: Any, n: int) -> None:
        bar[0].advance(n, " ".join(f"L{i + 1} {m.loss:.3f}" for i, m in enumerate(metrics)))

    try:
        res = train_run(spec, on_step=on_step, on_start=on_start)
    finally:
        for b in bar:
            b.close()
    if res.readied:
        print(res.readied)
    layers = " ".join(f"L{i + 1} {acc:.2%}" for i, acc in enumerate(res.test["layer_accuracy"]))
    rate = f" ({res.trained / res.seconds:.1f} samples/s)" if res.seconds > 0 and res.trained else ""
    print(f"trained in {res.seconds:.1f}s{rate}")
    print(f"test accuracy {res.test['accuracy']:.2%} on {res.test['samples']} images (per layer: {layers})")
    print(f"wrote {res.path} ({res.learner.samples_seen} samples seen)")


def eval_cmd(a: argparse.Namespace) -> None:
    """Test accuracy of an edge model (and each layer's own) or of an ONNX file in onnxruntime."""
    from edgeff.edge.data import load_edge_data

    model = a.model
    ds = load_edge_data(a.data, a.data_dir, cache_dir=a.cache_dir)
    if model.suffix == ".onnx":
        from edgeff.exporters.runtime import OnnxPredictor, evaluate_onnx

        res = {"accuracy": evaluate_onnx(OnnxPredictor(model), ds.test_batches(200, limit=a.limit)),
               "samples": min(a.limit or len(ds.y_test), len(ds.y_test)), "backend": "onnxruntime"}
    else:
        from edgeff.edge import evaluate, load
        from edgeff.edge.limits import check_fits
        from edgeff.edge.plan import still_needed

        learner, meta = load(model, optimizer=False)  # predicting: the optimizer's moments stay on disk
        check_fits(still_needed(learner, 200, predict_only=True), f"evaluating {model.name}")
        per_epoch = meta.get("samples_per_epoch")  # a readout not solved yet takes a pass over the training data
        learner.ready_to_predict(lambda: ds.train_batches(500, seed=0, limit=per_epoch))
        res = {**evaluate(learner, ds.test_batches(200, limit=a.limit), per_layer=True), "backend": "numpy"}
    if a.as_json:
        print(json.dumps(res))
        return
    print(f"test accuracy {res['accuracy']:.2%} on {res['samples']} images ({res['backend']})")
    if "layer_accuracy" in res:
        print("per layer: " + " ".join(f"L{i + 1} {acc:.2%}" for i, acc in enumerate(res["layer_accuracy"])))


def presets(a: argparse.Namespace) -> None:
    """The presets the edge runtime trains, and why the others need torch."""
    from edgeff.config import TrainConfig
    from edgeff.edge.learner import UnsupportedError, check_supported
    from edgeff.presets import PRESETS

    for name, p in PRESETS.items():
        if p.algorithm != "local":
            print(f"{name:20s} no: a backprop preset (train it with torch)")
            continue
        try:
            check_supported(p.model, p.train)
            print(f"{name:20s} yes")
        except UnsupportedError as e:
            try:
                check_supported(p.model, TrainConfig(**{**p.train.to_dict(), "schedule": "all"}))
                print(f"{name:20s} with --schedule all ({e})")
            except UnsupportedError:
                print(f"{name:20s} no: {e}")


def convert(a: argparse.Namespace) -> None:
    """Convert a torch checkpoint to an edge model or back (needs torch: run it on the laptop)."""
    try:
        from edgeff.interchange import convert_file
    except ImportError as e:
        raise UserError("convert needs torch (pip install torch); the edge runtime itself never does") from e
    print(f"wrote {convert_file(a.src, a.dst)}")


EVAL: tuple[Opt, ...] = (
    Opt("data", str, "builtin", "data set: builtin, mnist, fashion-mnist, cifar10 or cifar10-exact"),
    Opt("data_dir", Path, None, "folder holding the data set"),
    Opt("cache_dir", Path, None, "where .gz data files are unpacked [default: ~/.cache/edgeff]"),
    Opt("limit", int, None, "evaluate on the first N test images"),
    Opt("as_json", bool, False, "print one JSON object", flag="--json"),
)


def parser() -> Parser:
    p = Parser(prog=PROG, description="edgeff's edge runtime: train and run layer-local models with numpy alone "
               "(no torch).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    t = sub.add_parser("train", help=train.__doc__, description=train.__doc__)
    add_options(t, options("edge"))
    t.set_defaults(run=train)
    e = sub.add_parser("eval", help=eval_cmd.__doc__, description=eval_cmd.__doc__)
    e.add_argument("model", type=Path, help="an edge model (.npz) or an ONNX file (.onnx)")
    add_options(e, EVAL)
    e.set_defaults(run=eval_cmd)
    sub.add_parser("presets", help=presets.__doc__, description=presets.__doc__).set_defaults(run=presets)
    c = sub.add_parser("convert", help=convert.__doc__, description=convert.__doc__)
    c.add_argument("src", type=Path, help="a torch checkpoint (.pt) or an edge model (.npz)")
    c.add_argument("dst", type=Path, help="the file to write: .npz (edge) or .pt (torch)")
    c.set_defaults(run=convert)
    sub.add_parser("device-sim", help="run the simulated device (as `edgeff device-sim`; see its --help)",
                   add_help=False)
    return p


def _device_sim(argv: list[str]) -> int:
    """The same simulated device as ``edgeff device-sim`` (a typer command: typer is loaded for it alone)."""
    import typer
    from edgeff.cli.device import device_sim

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(device_sim)
    try:
        app(argv, prog_name=f"{PROG} device-sim", standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click's usage errors, in one line
        if type(e).__module__.startswith("click"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "device-sim":
        return _device_sim(args[1:])
    try:
        a = parser().parse_args(args)
        if a.command is None:
            parser().print_help()
            return 0
        a.run(a)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
