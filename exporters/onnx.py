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
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from edgeff.exporters.runtime import OnnxPredictor, evaluate_onnx  # noqa: F401 - torch-free, re-exported
from torch import nn

from edgeff import __version__
from edgeff.baseline import BPLearner
from edgeff.contrastive import ContrastiveLearner, pool_embeddings
from edgeff.errors import InputError
from edgeff.labels import ChannelEncoder, ICPEncoder, OverlayEncoder
from edgeff.layers import LocalLayer, RunningBatchNorm
from edgeff.mirror import MirrorLearner
from edgeff.model import GoodnessPredictor, HeadPredictor, select_layers
from edgeff.trainer import Learner

OPSET = 17


class FoldedNorm(nn.Module):
    """Inference form of ``RunningBatchNorm``: ``x * scale + shift`` per feature."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, bn: RunningBatchNorm) -> None:
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias.detach() - bn.running_mean * scale
        shape = (1, -1, 1, 1) if bn.spatial else (1, -1)
        self.register_buffer("scale", scale.view(shape).clone())
        self.register_buffer("shift", shift.view(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def inference_block(block: nn.Sequential) -> nn.Sequential:
    """A copy of ``block`` with every running-statistics BatchNorm folded."""
    return nn.Sequential(*[FoldedNorm(m) if isinstance(m, RunningBatchNorm) else m for m in block]).eval()


class AllLabels(nn.Module):
    """(B, C, H, W) -> (B*K, C', H, W): the input once per label, each with its label encoding."""

    codes: torch.Tensor

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.k = num_classes
        self.mode = "overlay" if isinstance(encoder, OverlayEncoder) else "channel"
        if isinstance(encoder, OverlayEncoder):
            codes = torch.eye(num_classes) * encoder.on_value  # (K, K)
        elif isinstance(encoder, ICPEncoder):
            codes = encoder.patterns.detach().clone()  # (K, 1, H, W)
        elif isinstance(encoder, ChannelEncoder):
            _, h, w = encoder.in_shape
            codes = encoder.matrix.detach().clone().view(num_classes, 1, h, w)
        else:
            raise TypeError(f"cannot export label encoder {type(encoder).__name__}")
        self.register_buffer("codes", codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xr = x.unsqueeze(1).expand(-1, self.k, -1, -1, -1)  # (B, K, C, H, W)
        codes = self.codes.unsqueeze(0).expand(b, *self.codes.shape)
        if self.mode == "overlay":
            flat = xr.reshape(b, self.k, c * h * w)
            z = torch.cat([codes, flat[:, :, self.k :]], dim=2)  # (B, K, C*H*W)
            return z.reshape(-1, c, h, w)
        return torch.cat([xr, codes], dim=2).reshape(-1, c + 1, h, w)  # (B*K, C+1, H, W)


class GoodnessGraph(nn.Module):
    """scores[b, k] = sum over the chosen layers of the goodness of x_b encoded with label k."""

    def __init__(self, learner: Learner, layers: str) -> None:
        super().__init__()
        self.k = learner.model_cfg.num_classes
        self.encode = AllLabels(learner.net.encoder, self.k)
        self.blocks = nn.ModuleList(inference_block(layer.block) for layer in learner.net.local_layers)
        self.idx = select_layers(layers, len(self.blocks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encode(x)
        total = torch.zeros_like(x[:, 0, 0, 0]).unsqueeze(1)  # (B, 1), broadcast below
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.idx:
                total = total + h.pow(2).flatten(1).mean(1).view(-1, self.k)  # (B, K)
            if i >= max(self.idx):
                break
        return total, total.argmax(1)


class HeadGraph(nn.Module):
    """One neutral-label pass and the softmax head's logits."""

    code: torch.Tensor

    def __init__(self, learner: Learner, head: HeadPredictor) -> None:
        super().__init__()
        enc = learner.net.encoder
        neutral = enc.neutral(torch.zeros(1, *learner.model_cfg.input_shape))  # (1, C', H, W)
        c = learner.model_cfg.input_shape[0]
        self.overlay = isinstance(enc, OverlayEncoder)
        self.k = learner.model_cfg.num_classes
        code = neutral.flatten(1)[:, : self.k] if self.overlay else neutral[:, c:]
        self.register_buffer("code", code.clone())
        self.blocks = nn.ModuleList(inference_block(layer.block) for layer in learner.net.local_layers)
        self.idx = head.idx
        self.scales = {i: math.sqrt(math.prod(learner.net.shapes[i])) for i in head.idx}
        self.linear = head.linear

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        code = self.code.expand(b, *self.code.shape[1:])
        if self.overlay:
            z = torch.cat([code, x.reshape(b, -1)[:, self.k :]], dim=1).reshape(b, c, h, w)
        else:
            z = torch.cat([x, code], dim=1)
        feats = []
        for i, block in enumerate(self.blocks):
            z = block(z)
            if i in self.idx:
                feats.append(F.normalize(z.flatten(1), dim=1) * self.scales[i])
        logits = self.linear(torch.cat(feats, dim=1))
        return logits, logits.argmax(1)


class BPGraph(nn.Module):
    def __init__(self, learner: BPLearner) -> None:
        super().__init__()
        self.blocks = inference_block(learner.net.blocks)
        self.head = learner.net.head
        self.global_pool = learner.net.global_pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(x)
        if self.global_pool:
            h = h.mean((2, 3)) if h.dim() == 4 else h.mean(1)
        logits = self.head(h.flatten(1))
        return logits, logits.argmax(1)


class ContrastiveGraph(nn.Module):
    """One pass: CFL scores (per-layer ⟨normalised mean feature, pooled embeddings⟩, summed over the
    chosen layers, as ``ContrastiveLearner.scores``) or CFF's head logits on the last layer's mean feature."""

    def __init__(self, learner: ContrastiveLearner, layers: str | None) -> None:
        super().__init__()
        net = learner.net
        self.blocks = nn.ModuleList(inference_block(layer.block) for layer in net.local_layers)
        self.groups = learner.model_cfg.groups
        self.cfl = net.embed is not None
        if self.cfl:
            assert net.embed is not None
            self.idx = select_layers(layers, len(self.blocks)) if layers else learner.eval_layers
            for i in self.idx:
                self.register_buffer(f"emb{i}", pool_embeddings(net.embed.detach(), net.widths[i]).T.clone())  # (C_l, Z)
        else:
            self.idx = [len(self.blocks) - 1]
            self.head = net.head

    def _mean(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 4:
            return h.mean((2, 3))  # (B, C): the mean over the H*W feature vectors
        if h.dim() == 3:
            return h.mean(1)  # (B, E): the mean over the tokens
        return h.reshape(h.shape[0], self.groups, -1).mean(1)  # (B, C): the mean over the groups

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        per = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.idx:
                f = self._mean(h)
                per.append(f / f.norm(dim=1, keepdim=True).clamp_min(1e-12) @ getattr(self, f"emb{i}") if self.cfl
                           else self.head(f))
            if i >= max(self.idx):
                break
        scores = per[0] if len(per) == 1 else torch.stack(per).sum(0)
        return scores, scores.argmax(1)


class MirrorGraph(nn.Module):
    """Mirror FFCL: the mean of both models' sigmoid outputs."""

    def __init__(self, learner: MirrorLearner) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(*[inference_block(la.block) for la in m.local_layers])
                                    for m in learner.mirrors)
        self.outs = nn.ModuleList(m.out for m in learner.mirrors)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = [torch.sigmoid(out(blocks(x).flatten(1))) for blocks, out in zip(self.blocks, self.outs, strict=True)]
        scores = torch.stack(probs).mean(0)
        return scores, scores.argmax(1)


def inference_graph(learner: Learner | BPLearner | ContrastiveLearner | MirrorLearner,
                    layers: str | None = None) -> nn.Module:
    """The torch module that ``export_onnx`` traces (also usable as a fast torch predictor)."""
    if isinstance(learner, MirrorLearner):
        return MirrorGraph(learner).eval()
    if isinstance(learner, BPLearner):
        return BPGraph(learner).eval()
    if isinstance(learner, ContrastiveLearner):
        return ContrastiveGraph(learner, layers).eval()
    pred = learner.predictor
    if isinstance(pred, HeadPredictor) and layers is None:
        return HeadGraph(learner, pred).eval()
    sel = layers or (pred.layers if isinstance(pred, GoodnessPredictor) else "all-but-first")
    return GoodnessGraph(learner, sel).eval()


def _class_names(learner: Learner | BPLearner | ContrastiveLearner | MirrorLearner, meta: dict[str, Any]) -> list[str]:
    """The names the model was given (they follow ``add_class``), else the checkpoint's, else "0".."K-1"."""
    cfg = learner.model_cfg
    if cfg.class_names:
        return list(cfg.class_names)
    names = list(meta.get("classes", []))
    return names if len(names) == cfg.num_classes else list(cfg.names)


def _metadata(learner: Learner | BPLearner | ContrastiveLearner | MirrorLearner, meta: dict[str, Any], kind: str) -> dict[str, str]:
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
    learner: Learner | BPLearner | ContrastiveLearner | MirrorLearner,
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
    kind = "logits" if not isinstance(graph, GoodnessGraph) else f"goodness:{layers or 'default'}"
    if isinstance(graph, ContrastiveGraph) and graph.cfl:
        kind = f"label-embedding:{layers or learner.train_cfg.eval_layers}"
    sample = torch.zeros(2, *learner.model_cfg.input_shape)
    return _export_module(graph, sample, Path(path), ["scores", "label"], _metadata(learner, meta or {}, kind))


def export_layers(learner: Learner, folder: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """One ONNX file per local layer (input ``x`` -> output ``h``, plus its goodness ``g``) and a
    ``manifest.json`` giving the order, shapes and the label encoding constants needed to feed layer 1."""
    if not isinstance(learner, Learner):
        raise InputError("per-layer export is for goodness models; export the whole graph instead")
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


def parity(learner: Learner | BPLearner | ContrastiveLearner | MirrorLearner, predictor: OnnxPredictor, x: torch.Tensor) -> dict[str, float]:
    """Compare torch and onnxruntime on the same images: max |score difference| and label agreement."""
    st = learner.scores(x).cpu().numpy()
    so = predictor.scores(x.cpu().numpy())
    return {"n": float(len(x)), "max_abs_diff": float(np.abs(st - so).max()),
            "agreement": float((st.argmax(1) == so.argmax(1)).mean())}
