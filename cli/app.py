"""``edgeff``: the command line. Each command lives in its own module and calls the library; this file
puts them together and holds the options every command shares (``--version``, ``--threads``)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from edgeff.cli import continual, device, info, train
from edgeff.cli.common import err, out

app = typer.Typer(help="edgeff: on-device continual learning without backpropagation.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _version(value: bool) -> None:
    if value:
        from edgeff import __version__

        out.print(f"edgeff {__version__}")
        raise typer.Exit()


@app.callback()
def common(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch and numpy [default: all cores]")] = None,
) -> None:
    """edgeff: on-device continual learning without backpropagation."""
    if threads is None:
        return
    if threads < 1:
        err.print(f"[bold red]error:[/] --threads must be at least 1, got {threads}", highlight=False)
        raise typer.Exit(2)
    for var in THREAD_VARS:  # read when torch / numpy's BLAS load (the commands import them later)
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


app.command()(train.train)
app.command("eval")(train.eval_cmd)
app.command()(train.export)
app.command()(train.predict)
app.command()(info.memory)
app.command()(info.presets)
app.command()(info.explain)
app.command("add-class")(continual.add_class)
app.command()(continual.continual)
app.command()(continual.learn)
app.command("device-sim")(device.device_sim)
app.add_typer(device.device_app, name="device")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
