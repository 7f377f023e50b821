"""The recurrent layers and cells, from their equations, with torch.nn's interface.

- :mod:`whiteboard.nn.cells`: one time step of each cell, one equation per line. This is
  the reference every backend is tested against.
- :mod:`whiteboard.nn.layers`: RNN, LSTM, GRU and LayerNormLSTM, drop-ins for torch.nn's.
  A layer asks :func:`whiteboard.backends.choose` which loop runs each call.
- :mod:`whiteboard.nn.regularizers`: LockedDropout, EmbeddingDropout, WeightDrop, Zoneout, AR/TAR.
"""

from whiteboard.nn.cells import gru_step, layernorm_lstm_step, lstm_step, rnn_step
from whiteboard.nn.layers import GRU, LSTM, RNN, SEED_NAMES, TRACE_FIELDS, LayerNormLSTM, Trace

__all__ = ["RNN", "LSTM", "GRU", "LayerNormLSTM", "Trace", "TRACE_FIELDS", "SEED_NAMES",
           "rnn_step", "lstm_step", "gru_step", "layernorm_lstm_step"]
