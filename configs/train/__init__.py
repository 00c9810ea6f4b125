"""Training configs: each module defines `CONFIG` (a TrainConfig) and `DATA` (how the data was prepared).
Load one with `dspark train --config=configs/train/<name>.py`."""
