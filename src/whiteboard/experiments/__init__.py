"""The seed's experiment and its relatives: long-range tasks (:mod:`.tasks`), the models
compared on them (:mod:`.models`), their training (:mod:`.training`), RNN, LSTM and GRU
compared (:mod:`.comparison`), the memory horizon (:mod:`.horizon`) and ``whiteboard demo``
(:mod:`.demo`).

``whiteboard.experiments`` was one module before these moved here; its names are still
importable from the package.
"""

from whiteboard.experiments.comparison import *  # noqa: F401,F403 (the old module's names)
from whiteboard.experiments.models import *  # noqa: F401,F403
from whiteboard.experiments.training import *  # noqa: F401,F403
