"""Predict the classes of image files (or a ``.npy`` array) with a checkpoint or an exported ONNX file:
what ``edgeff predict`` prints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeff.data import load_pixels
from edgeff.images import image_files


@dataclass(frozen=True)
class Prediction:
    item: str  # the image file (or "path[i]" for the rows of an array)
    label: str
    index: int
    top: tuple[tuple[str, float], ...]  # the best classes and their scores, best first


def predict_images(model: str | Path, images: str | Path, *, top: int = 3) -> list[Prediction]:
    """Each image's class by ``model`` (an ``edgeff train`` checkpoint or an ``edgeff export`` ONNX file);
    uint8 pixels get the model's normalisation (its training set's mean and std)."""
    model = Path(model)
    if model.suffix == ".onnx":
        from edgeff.exporters.runtime import OnnxPredictor

        pred = OnnxPredictor(model)
        shape, names = tuple(pred.input_shape), list(pred.classes)
        mean, std = json.loads(pred.meta.get("mean") or "[]"), json.loads(pred.meta.get("std") or "[]")
        score = pred.scores
    else:
        from edgeff import checkpoint

        learner, meta = checkpoint.load(model, device="cpu")
        shape, names = learner.model_cfg.input_shape, list(learner.class_names)
        mean, std = meta.get("mean", []), meta.get("std", [])

        def score(x: np.ndarray) -> np.ndarray:
            import torch

            return learner.scores(torch.from_numpy(x)).numpy()

    arr = load_pixels(images, shape)  # (N, C, H, W)
    x = arr.astype(np.float32)
    if arr.dtype == np.uint8:
        c = shape[0]
        m = np.asarray(mean or [0.0] * c, np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(std or [1.0] * c, np.float32).reshape(1, -1, 1, 1)
        x = (x / 255.0 - m) / s
    scores = score(np.ascontiguousarray(x, dtype=np.float32))
    p = Path(images)
    items = [str(f) for f in image_files(p)] if p.is_dir() or p.suffix.lower() not in (".npy", ".npz") else \
        [f"{p}[{i}]" for i in range(len(x))]
    names = names if len(names) == scores.shape[1] else [str(i) for i in range(scores.shape[1])]
    out = []
    for item, row in zip(items, scores, strict=True):
        best = np.argsort(-row)[: max(1, top)]
        out.append(Prediction(item, names[int(best[0])], int(best[0]), tuple((names[int(j)], float(row[j])) for j in best)))
    return out


__all__ = ["Prediction", "predict_images"]
