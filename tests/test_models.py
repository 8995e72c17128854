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
