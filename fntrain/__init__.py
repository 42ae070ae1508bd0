"""fntrain: a pure-functional, minimal PyTorch training kit.

Five stateless functions (``train_epoch``, ``evaluate``, ``predict``, ``save_checkpoint``,
``load_checkpoint``) take model, loader, loss, optimizer and device explicitly and return
immutable records. You write the outer loop.
"""

from fntrain.checkpoint import load_checkpoint, save_checkpoint
from fntrain.data import TensorLoader, default_device
from fntrain.distributed import ShardSampler
from fntrain.loop import evaluate, predict, train_epoch
from fntrain.metrics import Metric, accuracy, top_k_accuracy
from fntrain.optim import param_groups
from fntrain.records import (
    Checkpoint,
    CheckpointError,
    EvalResult,
    NonFiniteLossError,
    Predictions,
    SavedCheckpoint,
    Step,
    TrainResult,
)

__version__ = "0.7.2"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "EvalResult",
    "Metric",
    "NonFiniteLossError",
    "Predictions",
    "SavedCheckpoint",
    "ShardSampler",
    "Step",
    "TensorLoader",
    "TrainResult",
    "accuracy",
    "default_device",
    "evaluate",
    "load_checkpoint",
    "param_groups",
    "predict",
    "save_checkpoint",
    "top_k_accuracy",
    "train_epoch",
]
