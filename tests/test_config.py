import pytest

from cirlab.config import ConfigError, load_config, parse_override


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: concat\ntrain:\n  lr: 0.1\n")
    config = load_config(path, ["train.lr=1e-3", "protocol.ks=[1,10]", "model.options.gate_layers=2",
                                "model.image_weights=null"])
    assert config.model.name == "concat"
    assert config.train.lr == 0.001
    assert config.protocol.ks == [1, 10]
    assert config.model.options == {"gate_layers": 2}
    assert config.model.image_weights is None


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(None, ["train.lrr=1"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_config(bad)
