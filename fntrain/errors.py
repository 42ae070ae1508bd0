"""Exceptions fntrain raises beyond the built-in ones."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A batch's loss was NaN or infinite; raised before ``optimizer.step()``.

    On CUDA with a fused optimizer the check runs on the device, so the error comes at the
    end of the epoch; the steps after the bad batch were skipped inside the optimizer's
    kernel and the model, buffers, optimizer and scheduler are as after the last good batch.

    Attributes:
        batch_index: the index of the offending batch in the loader (0-based).
        loss: the loss value that was not finite.
    """

    def __init__(self, batch_index: int, loss: float) -> None:
        self.batch_index = batch_index
        self.loss = loss
        super().__init__(
            f"the loss of batch {batch_index} is {loss}; the optimizer did not step and the "
            f"buffers were restored, so the model is as after the last finite batch. "
            f"Pass on_nonfinite='skip' to skip such batches instead"
        )


class CheckpointError(Exception):
    """A file is not a loadable fntrain checkpoint, or does not fit what it is loaded into."""
