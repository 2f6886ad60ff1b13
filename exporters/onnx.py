"""Export trained learners to ONNX with their prediction rule inside, and run them in onnxruntime.

The exported graph needs nothing but onnxruntime and numpy on the device:

- goodness models: the input is replicated once per label inside the graph, each copy gets its label
  encoding, every layer's goodness is computed and the chosen layers summed, then arg-max;
- softmax-head models: a neutral-label pass, the chosen layers' features, the head's logits;
- backprop models: the logits.

Outputs are ``scores`` (B, K) and ``label`` (B,) int64. The batch axis is dynamic. Running-statistics
BatchNorm is folded into one per-feature multiply-add (its normalisation sits *before* the weights
and the convolutions are zero-padded, so folding it into the weights themselves would change the
border pixels). Metadata (preset, class names, input shape and normalisation, edgeff version) is
stored in the model's ``metadata_props``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgeff.exporters.runtime import OnnxPredictor, evaluate_onnx  # noqa: F401 - torch-free, re-exported
from torch import nn

from edgeff import __version__
from edgeff.contract import LearnerBase
from edgeff.errors import InputError, UnsupportedError
from edgeff.graphs import AllLabels, FoldedNorm, inference_block  # noqa: F401 - re-exported
from edgeff.layers import LocalLayer

OPSET = 17


def inference_graph(learner: LearnerBase, layers: str | None = None) -> nn.Module:
    """The torch module that ``export_onnx`` traces (also usable as a fast torch predictor): the
    learner's own (``LearnerBase.inference_graph``)."""
    return learner.inference_graph(layers)


def _class_names(learner: LearnerBase, meta: dict[str, Any]) -> list[str]:
    """The names the model was given (they follow ``add_class``), else the checkpoint's, else "0".."K-1"."""
    cfg = learner.model_cfg
    if cfg.class_names:
        return list(cfg.class_names)
    names = list(meta.get("classes", []))
    return names if len(names) == cfg.num_classes else list(cfg.names)


def _metadata(learner: LearnerBase, meta: dict[str, Any], kind: str) -> dict[str, str]:
    return {
        "edgeff_version": __version__,
        "preset": str(meta.get("preset", "")),
        "dataset": str(meta.get("dataset", "")),
        "classes": json.dumps(_class_names(learner, meta)),
        "input_shape": json.dumps(list(learner.model_cfg.input_shape)),
        "mean": json.dumps(list(meta.get("mean", []))),
        "std": json.dumps(list(meta.get("std", []))),
        "prediction": kind,
    }


def _export_module(module: nn.Module, sample: torch.Tensor, path: Path, outputs: list[str],
                   props: dict[str, str]) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    dyn = {"x": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    # The TorchScript exporter (dynamo=False): the dynamo one needs onnxscript, which is not a dependency.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(module, (sample,), str(path), input_names=["x"], output_names=outputs,
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False)
    model = onnx.load(str(path))
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_onnx(
    learner: LearnerBase,
    path: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    layers: str | None = None,
) -> Path:
    """Write the inference graph of ``learner`` with its prediction rule to ``path``.

    Args:
        learner: a trained ``Learner`` or ``BPLearner`` (any device; exported from a CPU copy).
        meta: checkpoint metadata (preset, dataset, classes, mean, std) stored in the file.
        layers: for goodness models, override the layer selection (all, all-but-first, last, last:K).
    Returns:
        the path written.
    """
    graph = inference_graph(learner, layers).cpu()
    kind = learner.prediction_kind(layers)
    sample = torch.zeros(2, *learner.model_cfg.input_shape)
    return _export_module(graph, sample, Path(path), ["scores", "label"], _metadata(learner, meta or {}, kind))


def export_layers(learner: Any, folder: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """One ONNX file per local layer (input ``x`` -> output ``h``, plus its goodness ``g``) and a
    ``manifest.json`` giving the order, shapes and the label encoding constants needed to feed layer 1."""
    if not learner.supports("per_layer_export"):
        raise UnsupportedError(f"per-layer export is for goodness models (ff, symba, trifecta presets); this is a "
                               f"{learner.family} model: export the whole graph instead (drop --per-layer)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape: tuple[int, ...] = learner.net.encoder.out_shape()
    entries = []

    class _Layer(nn.Module):
        def __init__(self, block: nn.Sequential) -> None:
            super().__init__()
            self.block = inference_block(block)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.block(x)
            return h, h.pow(2).flatten(1).mean(1)

    for i, layer in enumerate(learner.net.local_layers):
        assert isinstance(layer, LocalLayer)
        name = f"layer{i + 1}.onnx"
        props = _metadata(learner, meta or {}, f"layer {i + 1}")
        _export_module(_Layer(layer.block).cpu(), torch.zeros(2, *shape), folder / name, ["h", "g"], props)
        out = tuple(learner.net.shapes[i])
        entries.append({"file": name, "input_shape": list(shape), "output_shape": list(out)})
        shape = out
    codes = AllLabels(learner.net.encoder, learner.model_cfg.num_classes).codes
    np.save(folder / "label_codes.npy", codes.cpu().numpy())
    manifest = {"edgeff_version": __version__, "label_encoder": type(learner.net.encoder).__name__,
                "label_codes": "label_codes.npy", "layers": entries, **_metadata(learner, meta or {}, "per-layer")}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder / "manifest.json"


def _quantize_constants(model: Any, min_elems: int = 1024) -> None:
    """Store every large float32 constant the quantizer left alone (the label-encoding codes) as int8
    with a per-tensor scale and a ``DequantizeLinear`` in front of its users (symmetric, zero point 0;
    binary ICP patterns come back exactly)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    for init in list(g.initializer):
        if init.data_type != TensorProto.FLOAT:
            continue
        a = numpy_helper.to_array(init)
        if a.size < min_elems:
            continue
        scale = float(np.abs(a).max()) / 127 or 1.0
        q = np.clip(np.round(a / scale), -127, 127).astype(np.int8)
        name = init.name
        g.initializer.remove(init)
        g.initializer.extend([numpy_helper.from_array(q, f"{name}_q8"),
                              numpy_helper.from_array(np.array(scale, np.float32), f"{name}_q8_scale"),
                              numpy_helper.from_array(np.array(0, np.int8), f"{name}_q8_zp")])
        g.node.insert(0, helper.make_node("DequantizeLinear", [f"{name}_q8", f"{name}_q8_scale", f"{name}_q8_zp"],
                                          [name], name=f"{name}_dequantize"))


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    *,
    mode: str = "static",
    calibration: list[np.ndarray] | None = None,
) -> Path:
    """int8 copy of an exported file with onnxruntime's quantization tools.

    ``static``: QDQ format, per-channel int8 weights and uint8 activations whose ranges come from
    ``calibration`` (batches of real, normalised training images). ``dynamic``: int8 weights, activation
    ranges computed at run time (MatMul/Gemm only in onnxruntime, so convolutions stay fp32).
    Large constants left in float32 (the label codes) are stored as int8 too. The metadata of ``src``
    is kept.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    if mode == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    elif mode == "static":
        if not calibration:
            raise InputError("static quantization needs calibration batches of real training images")
        batches = [np.ascontiguousarray(b, dtype=np.float32) for b in calibration]

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(batches)

            def get_next(self) -> dict[str, np.ndarray] | None:
                b = next(self.it, None)
                return None if b is None else {"x": b}

        quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    else:
        raise InputError(f"unknown quantization mode {mode!r}; choose static or dynamic")
    model = onnx.load(str(dst))
    _quantize_constants(model)
    have = {p.key for p in model.metadata_props}
    for p in onnx.load(str(src)).metadata_props:
        if p.key not in have:
            entry = model.metadata_props.add()
            entry.key, entry.value = p.key, p.value
    entry = model.metadata_props.add()
    entry.key, entry.value = "quantization", mode
    onnx.save(model, str(dst))
    return dst


def parity(learner: LearnerBase, predictor: OnnxPredictor, x: torch.Tensor) -> dict[str, float]:
    """Compare torch and onnxruntime on the same images: max |score difference|, the same relative to the
    largest |score| (an lda readout's scores can reach 1e7, where float32 rounding alone is ~1), and label
    agreement."""
    st = learner.scores(x).cpu().numpy()
    so = predictor.scores(x.cpu().numpy())
    diff = float(np.abs(st - so).max())
    return {"n": float(len(x)), "max_abs_diff": diff, "max_rel_diff": diff / max(float(np.abs(st).max()), 1e-30),
            "agreement": float((st.argmax(1) == so.argmax(1)).mean())}
