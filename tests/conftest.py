from __future__ import annotations

import pytest
import torch

from edgeff.data import ImageData, load_data


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist_small() -> ImageData:
    """The real MNIST subset shipped with the package (5,000 train / 1,000 test images)."""
    return load_data("builtin")


@pytest.fixture(scope="session")
def real_batch(mnist_small: ImageData) -> tuple[torch.Tensor, torch.Tensor]:
    """64 real MNIST training images and labels."""
    return next(mnist_small.train_batches(64, seed=0))


# presets whose readout statistics take gigabytes (kmeans-conv3200: 12800x12800 float64, ~4 such matrices in a
# solve): the tests parametrized over every preset run them only with `pytest -m slow`
HEAVY_PRESETS = frozenset({"kmeans-conv3200"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str) and v in HEAVY_PRESETS for v in params.values()):
            item.add_marker(pytest.mark.slow)


class EdgeResult:
    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output = exit_code, output


def _invoke_edge(args: list[str]) -> EdgeResult:
    """``edgeff-edge ARGS`` in this process (its argparse ``main``), stdout and stderr together, as typer's
    ``CliRunner.invoke`` gives them for the ``edgeff`` commands."""
    import contextlib
    import io

    from edgeff.cli.edge import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            code = main(args)
        except SystemExit as e:  # --help
            code = int(e.code or 0)
    return EdgeResult(code, buf.getvalue())


@pytest.fixture
def edge_cli():  # type: ignore[no-untyped-def]
    """Run ``edgeff-edge`` in-process: ``edge_cli(["train", ...])`` -> result with ``exit_code``, ``output``."""
    return _invoke_edge
