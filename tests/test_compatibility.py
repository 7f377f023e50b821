"""What users have keeps working: a run directory written by the version before this
round (commit eba55ee: no tokenizer in its vocabulary, no 'finished' in its counters)
loads, evaluates, predicts and resumes; the public API keeps its names."""

import json
import shutil
from pathlib import Path

import whiteboard
from whiteboard.cli import main
from whiteboard.lm.train import TrainingState

DATA = Path(__file__).parent / "data"


def test_a_run_written_by_the_previous_version_evaluates_predicts_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(DATA / "run-eba55ee", run)
    corpus = DATA / "run-eba55ee-corpus.txt"
    assert main(["evaluate", str(run), "--corpus", str(corpus), "--batch-size", "2"]) == 0
    assert main(["predict", str(run), "the cat", "--json"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", f"data.corpus={corpus}", "--set", "train.max_steps=40",
                 "--quiet"]) == 0
    raw = (run / "training_state.safetensors").read_bytes()
    counters = json.loads(json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["counters"])
    assert counters["step"] == 40


def test_old_counters_fill_the_training_state_and_unknown_ones_are_ignored():
    state = TrainingState.from_dict({"epoch": 2, "step": 7, "best_valid": 3.5, "someday": 1})
    assert (state.epoch, state.step, state.best_valid, state.finished, state.valid_history) == (2, 7, 3.5, False, [])
    assert TrainingState.from_dict(state.to_dict()) == state


def test_the_public_names_are_where_they_were():
    for name in ("RNN", "LSTM", "GRU", "LayerNormLSTM", "Trace", "TRACE_FIELDS", "SEED_NAMES", "rnn_step", "lstm_step",
                 "gru_step", "layernorm_lstm_step"):
        assert hasattr(whiteboard, name), name
    # The flat module names from before the subpackages (whiteboard._old_names).
    from whiteboard.checkpoint import atomic_write_bytes, atomic_write_text, load_run  # noqa: F401
    from whiteboard.regularizers import LockedDropout, WeightDrop, Zoneout, zoneout_mix  # noqa: F401
    from whiteboard.layers import GRU, LSTM, RNN, LayerNormLSTM, Trace, _RecurrentBase  # noqa: F401
    from whiteboard.fused import FusedGRU, FusedLSTM, FusedRNN, FusedLayerNormLSTM  # noqa: F401
    from whiteboard.native import enabled, load  # noqa: F401
    from whiteboard.config import RunConfig, resolve  # noqa: F401
    from whiteboard.experiments import CELLS, compare  # noqa: F401
    from whiteboard.inspection import build_report  # noqa: F401
    from whiteboard.generate import predict_next  # noqa: F401
