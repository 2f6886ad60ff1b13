"""Inference with onnxruntime and numpy alone (no torch): what a device that only predicts needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeff.edge.learner import as_batch
from edgeff.errors import InputError


class OnnxPredictor:
    """Predict with an exported file in onnxruntime: the same ``predict_one/predict_many`` as a learner.

    Inputs are normalised float32 images (B, C, H, W) (or one (C, H, W) image for ``predict_one``).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"ONNX file {self.path} does not exist; write one with `edgeff export`")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise InputError(f"{self.path} is not a readable ONNX file ({type(e).__name__}); write one with "
                             "`edgeff export`") from None
        props = self.session.get_modelmeta().custom_metadata_map
        outputs = {o.name for o in self.session.get_outputs()}
        if "input_shape" not in props or not {"scores", "label"} <= outputs:
            raise InputError(f"{self.path} is an ONNX file but not one `edgeff export` wrote (no input shape, "
                             "scores and label outputs); evaluate it with the tool that made it")
        self.meta = props
        self.input_shape = tuple(json.loads(props["input_shape"]))
        self.classes = json.loads(props.get("classes", "[]"))

    def _check(self, x: Any, single: bool) -> np.ndarray:
        """The same checks and messages as the learners (``edgeff.edge.learner.as_batch``)."""
        if hasattr(x, "detach"):  # a torch tensor, without importing torch
            x = x.detach().cpu().numpy()
        return np.ascontiguousarray(as_batch(x, self.input_shape, single=single), dtype=np.float32)

    def scores(self, x: Any) -> np.ndarray:
        return self.session.run(["scores"], {"x": self._check(x, False)})[0]

    def predict_many(self, x: Any) -> np.ndarray:
        return self.session.run(["label"], {"x": self._check(x, False)})[0]

    def predict_one(self, x: Any) -> int:
        return int(self.session.run(["label"], {"x": self._check(x, True)})[0][0])


def evaluate_onnx(predictor: OnnxPredictor, batches: Any) -> float:
    """Accuracy of an exported model over (x, y) batches."""
    correct = n = 0
    for x, y in batches:
        correct += int((predictor.predict_many(x) == np.asarray(y)).sum())
        n += len(y)
    if n == 0:
        raise InputError("no samples to evaluate")
    return correct / n
