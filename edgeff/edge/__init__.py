"""The edge runtime: edgeff's layer-local learners in numpy alone, for boards without torch.

``import edgeff.edge`` never imports torch (a test enforces it). See ``edgeff.edge.learner`` for
what it trains, ``edgeff.edge.store`` for its file format (which converts to and from torch
checkpoints with ``edgeff.interchange``), and ``edgeff.edge.data`` for data streamed from disk.
"""

from edgeff.edge.learner import EdgeLearner, UnsupportedError, evaluate, make_edge_learner
from edgeff.edge.store import load, save

__all__ = ["EdgeLearner", "UnsupportedError", "evaluate", "load", "make_edge_learner", "save"]
