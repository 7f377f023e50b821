"""whiteboard: recurrent sequence models written from their equations.

Glossary used in every shape comment:
    B batch, T time, I input features, E embedding, H hidden, V vocabulary,
    L layers, D directions (2 if bidirectional), G gates per cell (RNN 1, LSTM 4, GRU 3).

The seed's whiteboard words map onto the standard names like this:
    input gate i_t   -> selective read      forget gate f_t -> selective forget
    output gate o_t  -> selective write     cell state c_t  -> the whiteboard itself
"""

from whiteboard import _old_names

_old_names.install()  # before anything imports a module by its old name

from whiteboard import backends  # noqa: E402
from whiteboard.nn.cell_modules import GRUCell, LayerNormLSTMCell, LSTMCell, RNNCell  # noqa: E402
from whiteboard.nn.cells import gru_step, layernorm_lstm_step, lstm_step, rnn_step  # noqa: E402
from whiteboard.nn.layers import GRU, LSTM, RNN, SEED_NAMES, TRACE_FIELDS, LayerNormLSTM, Trace  # noqa: E402

__all__ = [
    "RNN",
    "LSTM",
    "GRU",
    "LayerNormLSTM",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "LayerNormLSTMCell",
    "Trace",
    "TRACE_FIELDS",
    "SEED_NAMES",
    "rnn_step",
    "lstm_step",
    "gru_step",
    "layernorm_lstm_step",
    "backends",
]
__version__ = "0.1.0"
