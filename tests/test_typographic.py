"""Typographic attack: rendering mechanics on real images, and the class it writes."""

from __future__ import annotations

import pytest
import torch

from mmcoa.attacks import AttackError, create_attack
from mmcoa.attacks.objectives import ZeroShotImageObjective
from mmcoa.attacks.typographic import render_text

N = 64


@pytest.fixture
def setup(classifier, fmnist):
    _, test = fmnist
    x, y = test.float_images(slice(0, N)), test.labels[:N]
    return ZeroShotImageObjective(classifier, y, classnames=list(test.classnames)), x, y, list(test.classnames)


@pytest.mark.parametrize("position,background", [("center", False), ("bottom", True), ("top", False)])
def test_pixels_change_only_inside_the_text_box(setup, position, background):
    objective, x, y, names = setup
    attack = create_attack("typographic", text="target", target=0, font_frac=0.4, position=position, background=background)
    adv = attack.perturb(x, objective)
    _, (t, l, b, r) = render_text(names[0], 28, 28, 0.4, position)
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[t:b, l:r] = True
    moved = (adv != x).any(1)  # [N, H, W]
    assert not moved[:, ~inside].any()
    assert moved[y != 0][:, inside].flatten(1).any(1).all()  # every attacked image got ink
    assert torch.equal(adv[y == 0], x[y == 0])  # the target's own class is left alone
    assert adv.min() >= 0 and adv.max() <= 1


def test_opacity_zero_is_identity_and_blend_is_linear(setup):
    objective, x, _, _ = setup
    same = create_attack("typographic", opacity=0.0).perturb(x, objective)
    assert torch.equal(same, x) and same is not x
    full = create_attack("typographic", text="target", target=1, color="white").perturb(x, objective)
    half = create_attack("typographic", text="target", target=1, color="white", opacity=0.5).perturb(x, objective)
    assert torch.allclose(half, (x + full) / 2, atol=1e-6)  # alpha blending, halfway at opacity 0.5


def test_confusing_writes_the_top_wrong_class(setup, classifier):
    objective, x, y, names = setup
    attack = create_attack("typographic", font_frac=0.3)
    adv = attack.perturb(x, objective)
    with torch.no_grad():
        logits = classifier(x)
    logits[torch.arange(N), y] = float("-inf")
    expected = torch.stack([attack.write(x[i], names[int(logits[i].argmax())]) for i in range(N)])
    assert torch.equal(adv, expected)
    assert not torch.equal(adv, x)


@pytest.mark.parametrize("shape", [(3, 64, 96), (1, 28, 28), (3, 224, 224)])
def test_any_image_size(shape):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = create_attack("typographic", text="target", target=0, font_frac=0.2).write(image, "sandal")
    assert out.shape == image.shape and (out != image).any()
    assert out.min() >= 0 and out.max() <= 1


def test_params_and_errors(setup, classifier):
    objective, x, y, _ = setup
    with pytest.raises(AttackError, match="target"):
        create_attack("typographic", text="target")
    with pytest.raises(AttackError, match="class names"):
        create_attack("typographic").perturb(x, ZeroShotImageObjective(classifier, y))
    with pytest.raises(AttackError, match="classes"):
        create_attack("typographic", text="target", target=99).perturb(x, objective)
