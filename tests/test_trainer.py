"""Training loop on a tiny SYNTHETIC image set (random textures whose brightness encodes the class)."""

import numpy as np
import pytest
import torch

from breastfusion.config import TrainConfig
from breastfusion.models.fusion import FusionClassifier
from breastfusion.models.pretrained import create_backbone
from breastfusion.training import trainer as trainer_mod
from breastfusion.training.data import CasesDataset, UltrasoundAugment
from breastfusion.training.trainer import inverse_frequency_weights, predict_proba, train_model
from conftest import write_png


def _data(tmp_path, n=24):
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(n):
        y = i % 3
        write_png(tmp_path / f"i{i}.png", (rng.random((40, 50)) * 80 + 60 * y).astype(np.uint8))
        paths.append(str(tmp_path / f"i{i}.png"))
        labels.append(y)
    labels = np.array(labels)
    tab = rng.normal(size=(n, 4)).astype(np.float32)
    tab[:, 0] += labels
    kw = dict(size=32, mean=[0.5] * 3, std=[0.5] * 3)
    train = CasesDataset(paths[:18], tab[:18], labels[:18], augment=UltrasoundAugment(32), **kw)
    val = CasesDataset(paths[18:], tab[18:], labels[18:], **kw)
    return train, val, labels


def _model(seed=0):
    torch.manual_seed(seed)
    backbone, _ = create_backbone("test_efficientnet", pretrained=False)
    return FusionClassifier(3, backbone=backbone, n_tabular=4)


def test_inverse_frequency_weights():
    w = inverse_frequency_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(w.numpy(), [4 / 9, 4 / 3, 0.0], rtol=1e-6)


def test_stage1_freezes_backbone(tmp_path):
    train, val, labels = _data(tmp_path)
    model = _model()
    before = {k: v.clone() for k, v in model.image_encoder.backbone.state_dict().items()}
    head_before = model.head[-1].weight.clone()
    cfg = TrainConfig(stage1_epochs=2, stage2_epochs=0, batch_size=6, channels_last=False)
    res = train_model(model, train, val, cfg, n_classes=3, train_labels=labels[:18], ckpt_dir=tmp_path / "ck",
                      progress=False)
    after = model.image_encoder.backbone.state_dict()
    for k, v in before.items():  # weights and BatchNorm running statistics both untouched
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(model.head[-1].weight, head_before)
    assert len(res.history) == 2 and all(h["stage"] == 1 for h in res.history)
    assert (tmp_path / "ck" / "best.safetensors").exists() and (tmp_path / "ck" / "last.pt").exists()


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    train, val, labels = _data(tmp_path)
    cfg = TrainConfig(stage1_epochs=1, stage2_epochs=2, batch_size=6, channels_last=False, patience=5)
    ref = _model()
    ref_res = train_model(ref, train, val, cfg, n_classes=3, train_labels=labels[:18], ckpt_dir=tmp_path / "a",
                          progress=False)

    real_save = trainer_mod._save_checkpoint
    calls = {"n": 0}

    def kill_after_second(path, state):
        real_save(path, state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies right after the epoch-2 checkpoint

    monkeypatch.setattr(trainer_mod, "_save_checkpoint", kill_after_second)
    with pytest.raises(KeyboardInterrupt):
        train_model(_model(), train, val, cfg, n_classes=3, train_labels=labels[:18], ckpt_dir=tmp_path / "b",
                    progress=False)
    monkeypatch.setattr(trainer_mod, "_save_checkpoint", real_save)
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    res = train_model(resumed, train, val, cfg, n_classes=3, train_labels=labels[:18], ckpt_dir=tmp_path / "b",
                      resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert res.best_epoch == ref_res.best_epoch
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_predict_proba_rows_sum_to_one(tmp_path):
    train, val, _ = _data(tmp_path)
    p = predict_proba(_model(), val, batch_size=4, channels_last=False)
    assert p.shape == (6, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


def test_zero_epochs_is_refused_not_saved_as_an_untrained_model(tmp_path):
    from breastfusion.errors import ConfigError

    train, val, labels = _data(tmp_path)
    cfg = TrainConfig(stage1_epochs=0, stage2_epochs=0, batch_size=6, channels_last=False)
    with pytest.raises(ConfigError, match="both 0"):
        train_model(_model(), train, val, cfg, n_classes=3, train_labels=labels[:18], ckpt_dir=tmp_path / "ck",
                    progress=False)
    assert not (tmp_path / "ck").exists()
