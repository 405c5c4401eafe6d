"""`nestlearn train`: train any model of the family on prepared shards, on one device or with torchrun.

What this is: the package of the training pipeline, read in this order:
    config.py       TrainConfig (typed, checked) and load_config (YAML / Python file + key=value overrides)
    run.py          Run (what one process holds) and Stop (SIGINT / SIGTERM finish the step, then stop)
    loop.py         train(cfg): set-up, steps with non-finite guards, evaluation, safe stops (signals, time)
    checkpoints.py  atomic checkpoints from finite state only (the state serializer of nestlearn/io.py); resume from
                    the newest intact one, same run only
    metrics.py      metrics.jsonl (truncated to the resumed step), TensorBoard, the loss PNG
    command.py      the command line: one-line errors instead of tracebacks
Each rank owns its sequences, their memory states and online CMS updates (the state never crosses ranks); DDP or
FSDP2 (`fully_shard`) under torchrun. What it is not: data preparation (`nestlearn data prepare`) or evaluation.
"""

from .checkpoints import TrainingDiverged, code_version
from .command import main
from .config import TrainConfig, load_config
from .loop import evaluate, lr_factor, train

__all__ = ["TrainConfig", "TrainingDiverged", "code_version", "evaluate", "load_config", "lr_factor", "main",
           "train"]  # fmt: skip
