"""The recurrent layers and cells, from their equations, with torch.nn's interface.

- :mod:`whiteboard.nn.cells`: one time step of each cell, one equation per line. This is
  the reference every backend is tested against.
- :mod:`whiteboard.nn.layers`: RNN, LSTM, GRU and LayerNormLSTM, drop-ins for torch.nn's.
  A layer asks :func:`whiteboard.backends.choose` which loop runs each call.
- :mod:`whiteboard.nn.cell_modules`: RNNCell, LSTMCell, GRUCell, LayerNormLSTMCell, one step as a module.
- :mod:`whiteboard.nn.regularizers`: LockedDropout, EmbeddingDropout, WeightDrop, Zoneout, AR/TAR.
"""

