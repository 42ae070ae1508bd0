"""Exceptions fntrain raises beyond the built-in ones."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """A batch's loss was NaN or infinite; no step was taken with it.

    By default raised before that batch's ``optimizer.step()``. With
    ``on_nonfinite="defer"`` the check runs on the device, so the error comes a few batches
    later; the steps in between were skipped inside the fused optimizer's kernel, and the
    model, buffers, optimizer and scheduler were put back as after the last good batch.

    Attributes:
        batch_index: the index of the offending batch in the loader (0-based).
        loss: the loss value that was not finite.
    """

    def __init__(self, batch_index: int, loss: float, deferred: bool = False) -> None:
        self.batch_index = batch_index
        self.loss = loss
        how = (
            "it was found on the device, so the optimizer skipped every step from it on, and "
            "the buffers, optimizer and scheduler were put back"
            if deferred
            else "the optimizer did not step and the buffers were restored"
        )
        super().__init__(
            f"the loss of batch {batch_index} is {loss}; {how}, so the model is as after the "
            f"last finite batch. Pass on_nonfinite='skip' to skip such batches instead"
        )


class CheckpointError(Exception):
    """A file is not a loadable fntrain checkpoint, or does not fit what it is loaded into."""
