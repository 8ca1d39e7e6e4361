from lora_ops.training.controller import Controller
from lora_ops.training.loop import (
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    load_trainable_state,
    train,
    trainable_state,
)

__all__ = ["Controller", "TrainConfig", "TrainResult", "TrainingInterrupted", "load_trainable_state",
           "train", "trainable_state"]
