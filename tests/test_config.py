import pytest

from whiteboard.lm import config as cfg
from whiteboard.errors import UsageError


def test_layers_defaults_preset_file_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = 0.5\nepochs = 3\n[model]\ncell = "gru"\n')
    config = cfg.resolve("zaremba-small", path, ["train.epochs=7"])
    assert config.model.hidden_size == 200  # preset
    assert config.train.lr == 0.5  # file over preset
    assert config.train.epochs == 7  # --set over file
    assert config.model.cell == "gru"
    assert config.train.decay_start == 4


def test_zaremba_small_is_the_published_configuration():
    c = cfg.resolve("zaremba-small")
    assert (c.model.num_layers, c.model.hidden_size, c.model.init_range) == (2, 200, 0.1)
    assert (c.train.optimizer, c.train.lr, c.train.epochs, c.train.bptt, c.train.batch_size, c.train.clip) == ("sgd", 1.0, 13, 20, 20, 5.0)
    assert (c.train.lr_decay, c.train.decay_start) == (0.5, 4)


@pytest.mark.parametrize(
    "sets,message",
    [
        (["train.nope=1"], "unknown config key train.nope"),
        (["nope.lr=1"], "unknown config section 'nope'"),
        (["train.epochs=1.5"], "train.epochs takes a int, got '1.5'"),
        (["model.tie_weights=maybe"], "model.tie_weights takes a bool"),
        (["model.cell=transformer"], "model.cell must be one of"),
        (["train.lr"], "--set takes section.key=value"),
        (["model.hidden_dropout=1.0"], "model.hidden_dropout must be below 1"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(sets, message):
    with pytest.raises(UsageError, match=message):
        cfg.resolve(sets=sets)


def test_type_change_in_a_file_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nepochs = "many"\n')
    with pytest.raises(UsageError, match="train.epochs takes a int"):
        cfg.resolve(file=path)


def test_presets_are_listed_and_loadable():
    names = cfg.preset_names()
    assert {"zaremba-small", "shakespeare-char"} <= set(names)
    for name in names:
        cfg.resolve(name)


def test_config_json_round_trip():
    config = cfg.resolve("shakespeare-char")
    assert cfg.from_json(config.to_dict()) == config
