"""Errors a user can cause. Each message says what to do; the learner's state is left untouched."""


class EdgeFFError(Exception):
    """Base class of the errors edgeff raises for user mistakes."""


class InputError(EdgeFFError, ValueError):
    """A batch with the wrong shape, dtype, label range, or non-finite values."""


class UnsupportedError(InputError):
    """Something this learner's family or runtime does not do (e.g. per-layer predictions of a backprop
    net, a ViT on the numpy edge runtime)."""


class CheckpointError(EdgeFFError):
    """A missing, corrupt or incompatible checkpoint file."""


class DataNotFoundError(EdgeFFError, FileNotFoundError):
    """A data set whose files are not where they were looked for."""


class UnknownPresetError(EdgeFFError, KeyError):
    """A preset name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
