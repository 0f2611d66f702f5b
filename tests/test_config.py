import pytest

from breastfusion.config import load_config, save_config
from breastfusion.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["train.stage2_epochs=3", "model.backbone=efficientnet_b0", "data.labels=[a, b]"])
    assert cfg.train.stage2_epochs == 3 and cfg.model.backbone == "efficientnet_b0" and cfg.data.labels == ["a", "b"]
    assert cfg.model.image_dim == 256 and cfg.model.tabular_dim == 64
    path = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(path) == cfg


def test_unknown_key_suggests_close_match(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  stage2_epoch: 3\n")
    with pytest.raises(ConfigError, match="train.stage2_epoch: unknown key; did you mean 'stage2_epochs'"):
        load_config(tmp_path / "c.yaml")


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="cv.n_splits"):
        load_config(None, ["cv.n_splits=1"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(None, ["cv.n_splits"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")
