import pytest

from qtllava.config import ConfigError, PRESETS, config_hash, from_dict, load_config, preset, to_toml


def test_presets_round_trip_through_toml(tmp_path):
    import tomllib

    for name in PRESETS:
        cfg = preset(name)
        text = to_toml(cfg)
        assert from_dict(tomllib.loads(text)) == cfg
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        assert load_config(path) == cfg


def test_overrides_and_types():
    cfg = load_config("micro", ["train.stage0.steps=7", "compress.image.name=fsq", "compress.image.levels=8",
                                "vision.image_mean=[0.1, 0.2, 0.3]"])
    assert cfg.train.stage0.steps == 7 and cfg.compress.image.name == "fsq" and cfg.compress.image.levels == 8
    assert cfg.vision.image_mean == (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config("micro", ["train.stage0.steps=many"])


def test_unknown_keys_and_names_raise(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ConfigError, match="train.stage0.stepz"):
        load_config("micro", ["train.stage0.stepz=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "micro"\n[vision]\nkind = "siglip"\nlayers = 3\n')
    with pytest.raises(ConfigError, match=r"bad.toml.*vision.layers"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_paper_preset_is_real_scale_and_needs_local_weights():
    cfg = preset("paper")
    assert cfg.vision.num_image_tokens == 729 and cfg.vision.hidden_size == 1152
    assert cfg.vision.pretrained == "" and cfg.llm.pretrained == ""  # the user points these at local folders


def test_config_hash_covers_model_and_compressor_only():
    a, b = preset("micro"), preset("micro")
    b.train.stage0.steps += 1
    assert config_hash(a) == config_hash(b)
    b.compress.image.levels = 8
    assert config_hash(a) != config_hash(b)


def test_config_files_match_presets():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in PRESETS:
        assert load_config(root / f"{name}.toml") == preset(name), name
    cfg = load_config(root / "tiny-fsq4-ans.toml")
    assert cfg.name == "tiny" and cfg.compress.image.coder == "ans" and cfg.compress.downlink == "int8"


def test_custom_name_starts_from_defaults():
    cfg = from_dict({"name": "my-run", "train": {"seed": 3}})
    assert cfg.name == "my-run" and cfg.train.seed == 3 and cfg.vision == preset("tiny").vision
    assert from_dict({"preset": "micro", "name": "x"}).vision == preset("micro").vision


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from qtllava.cli import main

    assert main(["config", "--config", "micro", "-o", "vision.nope=1"]) == 2
    assert "vision.nope" in capsys.readouterr().err
    assert main(["eval", "--config", "micro", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "none")]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err
