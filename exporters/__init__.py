"""ONNX export and onnxruntime evaluation (installed as ``edgeff.exporters``); see the export issue."""
