import math
import pytest

from lstmlm.config import (Config, ConfigError, list_presets, load_preset, parse_assignment,
                           parse_value)


def test_baseline_preset_matches_the_seed():
    cfg = load_preset("lstm-baseline")
    assert (cfg.embedding_size, cfg.hidden_size, cfg.num_layers) == (380, 400, 2)
    assert (cfg.dropout_input, cfg.dropout_hidden, cfg.dropout_output) == (0.2, 0.2, 0.2)
    assert (cfg.weight_decay, cfg.batch_size, cfg.epochs, cfg.lr) == (1e-6, 20, 40, 0.5)


def test_presets_listed_with_descriptions():
    presets = dict(list_presets())
    assert "lstm-baseline" in presets and presets["lstm-baseline"]


def test_preset_from_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "x"\nhidden_size = 64\nlr = 20\n')
    cfg = load_preset(str(path))
    assert cfg.hidden_size == 64 and cfg.lr == 20.0 and isinstance(cfg.lr, float)


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean lstm-baseline"):
        load_preset("lstm-basline")


@pytest.mark.parametrize("text, key, value", [
    ("hidden_size=650", "hidden_size", 650),
    ("dropout-output=0.5", "dropout_output", 0.5),
    ("optimizer=adam", "optimizer", "adam"),
])
def test_assignments(text, key, value):
    assert parse_assignment(text) == (key, value)


@pytest.mark.parametrize("key, text, message", [
    ("batch_size", "abc", "batch_size must be int"),
    ("batch_size", "1.5", "batch_size must be int"),
    ("lr", "fast", "lr must be float"),
    ("hiden_size", "3", "did you mean hidden_size"),
])
def test_bad_values(key, text, message):
    with pytest.raises(ConfigError, match=message):
        parse_value(key, text)


def test_missing_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("hidden_size")


@pytest.mark.parametrize("values, message", [
    ({"dropout_output": 1.0}, r"dropout_output must be in \[0, 1\)"),
    ({"dropout_input": -0.1}, "dropout_input must be in"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"min_count": 0}, "min_count must be at least 1"),
    ({"max_vocab": 2}, r"max_vocab must be 0 \(no limit\) or at least 3"),
    ({"hidden_size": 2**70}, r"hidden_size must be below 2\*\*31, got 1180591620717411303424"),
    ({"num_layers": 2**31}, r"num_layers must be below 2\*\*31"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"stop_patience": -1}, "stop_patience must be >= 0, got -1"),
    ({"optimizer": "rmsprop"}, "optimizer must be"),
    ({"hidden_size": "400"}, "hidden_size must be int"),
    ({"lr": True}, "lr must be float"),
    ({"average_from": 1.0}, r"average_from must be in \[0, 1\)"),
    ({"average_from": 0.8, "ntasgd": True}, "set only one"),
    ({"colour": 1}, "unknown config key"),
    ({"seed": 2**64}, "seed must be a 64-bit integer"),
    ({"lr": math.inf}, "lr must be a finite number, got inf"),
    ({"clip": math.inf}, "clip must be a finite number"),
])
def test_impossible_configs(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(values)


@pytest.mark.parametrize("files, message", [
    ({"a.toml": 'base = "b.toml"\n', "b.toml": 'base = "a.toml"\n'}, "a loop of bases"),
    ({"a.toml": 'base = "a.toml"\n'}, "a loop of bases"),
    ({"a.toml": "base = 5\n"}, "base must be a preset name or a .toml path, got 5"),
    ({"a.toml": 'base = "missing.toml"\n'}, "preset file .*missing.toml: not found"),
])
def test_bad_preset_bases(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_preset(str(tmp_path / "a.toml"))


def test_json_round_trip():
    cfg = load_preset("lstm-baseline")
    cfg.update({"hidden_size": 123})
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_preset_files_inherit_from_a_base(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "parent.toml").write_text('hidden_size = 64\nlr = 3\n')
    (tmp_path / "sub" / "child.toml").write_text('base = "parent.toml"\nlr = 7\n')
    cfg = load_preset(str(tmp_path / "sub" / "child.toml"))
    assert (cfg.hidden_size, cfg.lr) == (64, 7.0)
    named = load_preset("awd-lstm-no-ar-tar")
    assert named.hidden_size == 1150 and named.ar_alpha == 0.0
