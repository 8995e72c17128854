import pytest
import torch

from bnlab.models import build, model_names


@pytest.mark.parametrize("name", model_names())
def test_forward_backward_every_model(name):
    m = build(name, in_channels=1, input_size=8, num_classes=7, width=0.25)
    x = torch.randn(4, 1, 8, 8)
    y = m(x)
    assert y.shape == (4, 7)
    y.sum().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bad_names_give_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet999'"):
        build("resnet999")
    with pytest.raises(ValueError, match="unknown norm 'bogus'"):
        build("resnet20", norm="bogus")
    with pytest.raises(ValueError, match="unknown activation 'softplusx'"):
        build("resnet20", act="softplusx")
    with pytest.raises(ValueError, match="expects input"):
        build("resnet20", in_channels=3)(torch.randn(2, 1, 8, 8))


PBN_MODELS = ["mlp", "plainnet18", "plainnet34", "resnet18", "resnet34", "resnet50"]


@pytest.mark.parametrize("norm", ["bn", "none", "cbn"])
@pytest.mark.parametrize("name", ["mlp", "resnet20", "resnet50", "plainnet18", "vgg11"])
def test_norms_plug_into_models(name, norm):
    m = build(name, norm=norm, act="tanh", in_channels=3, input_size=8, num_classes=5, width=0.125)
    y = m(torch.randn(6, 3, 8, 8))
    assert y.shape == (6, 5)
    y.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", PBN_MODELS)
def test_pbn_models_forward_backward(name):
    m = build(name, norm="pbn", in_channels=3, input_size=8, num_classes=5, width=0.125)
    y = m(torch.randn(6, 3, 8, 8))
    assert y.shape == (6, 5) and torch.isfinite(y).all()
    y.square().mean().backward()


def test_resnet_shortcut_options():
    a = build("resnet20", width=0.5)
    b = build("resnet20", width=0.5, shortcut="B")
    assert sum(p.numel() for p in b.parameters()) > sum(p.numel() for p in a.parameters())
    with pytest.raises(ValueError, match="shortcut"):
        build("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="unknown option"):
        build("vgg11", shortcut="A")


def test_norm_family_is_a_norm_layer_factory():
    from bnlab.nn import BatchNormAct, get_norm

    fam = get_norm("bn", "relu")
    layer = fam(16)  # timm/torchvision-style norm_layer(num_features)
    assert isinstance(layer, BatchNormAct) and layer.num_features == 16
