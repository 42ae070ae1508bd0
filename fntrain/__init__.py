"""fntrain: a pure-functional, minimal PyTorch training kit.

Five stateless functions (``train_epoch``, ``evaluate``, ``predict``, ``save_checkpoint``,
``load_checkpoint``) take model, loader, loss, optimizer and device explicitly and return
immutable records. You write the outer loop.
"""

from fntrain.device import default_device
from fntrain.errors import NonFiniteLossError
from fntrain.loop import evaluate, predict, train_epoch
from fntrain.metrics import Metric, accuracy, top_k_accuracy
from fntrain.records import EvalResult, Predictions, TrainResult

__version__ = "0.1.0"

__all__ = [
    "EvalResult",
    "Metric",
    "NonFiniteLossError",
    "Predictions",
    "TrainResult",
    "accuracy",
    "default_device",
    "evaluate",
    "predict",
    "top_k_accuracy",
    "train_epoch",
]
