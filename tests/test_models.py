import pytest
import timm
import torch

from medssl.models import SSLModel, create_backbone
from medssl.models.heads import Prototypes

BACKBONES = ["resnet18", "resnet50", "densenet121", "vit_small_patch16_224"]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_is_single_channel_and_takes_local_crop_sizes(name, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("create_backbone asked timm for pretrained weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_download)
    model, dim = create_backbone(name)
    model.eval()
    with torch.no_grad():
        for size in (96, 48):
            features = model(torch.randn(2, 1, size, size))
            assert features.shape == (2, dim)
            assert torch.isfinite(features).all()
    with pytest.raises(RuntimeError):  # a 3-channel input proves in_chans=1 took effect
        with torch.no_grad():
            model(torch.randn(1, 3, 48, 48))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet_does_not_exist")


def test_prototypes_have_unit_rows_after_init_and_after_a_step():
    protos = Prototypes(16, 30)
    assert torch.allclose(protos.weight.norm(dim=1), torch.ones(30), atol=1e-6)
    with torch.no_grad():
        protos.weight.mul_(3.0).add_(0.1)
    protos.normalize_()
    assert torch.allclose(protos.weight.norm(dim=1), torch.ones(30), atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_shapes_and_normalised_embeddings(channels_last):
    model = SSLModel("resnet18", proj_hidden=32, proj_dim=16, n_prototypes=10, channels_last=channels_last)
    crops = [torch.randn(3, 1, 96, 96) for _ in range(2)] + [torch.randn(3, 1, 48, 48) for _ in range(4)]
    z, scores = model(crops)
    assert len(z) == len(scores) == 6
    assert all(e.shape == (3, 16) for e in z)
    assert all(s.shape == (3, 10) for s in scores)
    for e in z:
        assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    # scores are cosine similarities with unit prototypes
    assert all(s.abs().max() <= 1 + 1e-5 for s in scores)
    sum(s.sum() for s in scores).backward()
    assert model.backbone.conv1.weight.grad is not None


def test_grouped_forward_equals_crop_by_crop_backbone():
    model = SSLModel("resnet18", proj_hidden=32, proj_dim=16, n_prototypes=10).eval()
    crops = [torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64), torch.randn(2, 1, 32, 32)]
    with torch.no_grad():
        z, _ = model(crops)
        for crop, e in zip(crops, z):
            alone = torch.nn.functional.normalize(model.projection(model.backbone(crop)), dim=1)
            assert torch.allclose(alone, e, atol=1e-5)
