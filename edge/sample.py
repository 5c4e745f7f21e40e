"""What an edge source yields: one input of the model, batch of one."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One model input. `inputs` maps each model input name to an array with a leading batch of 1."""

    id: int
    inputs: dict[str, np.ndarray]
    label: int | None = None  # ground truth when the source knows it (simulated or labelled data)
    meta: dict = field(default_factory=dict)  # e.g. capture time, source file, window start
