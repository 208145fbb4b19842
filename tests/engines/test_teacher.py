from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from engines.teacher import (
    DEFAULT_TAPS,
    SameConv2d,
    build_teacher,
    load_lite0,
    normalize_input,
    tap_channels,
    tap_strides,
)


@pytest.fixture(scope="module")
def lite0():
    return load_lite0()


def test_strict_load_of_the_packaged_imagenet_weights(lite0):
    model, sha = lite0
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert len(sha) == 64
    assert not any(p.requires_grad for p in model.parameters())


def test_coffee_photo_is_classified_as_espresso(lite0):
    """Proves the weights are real ImageNet weights and the architecture (SAME padding, ReLU6) is right."""
    from skimage import data

    model, _ = lite0
    img = cv2.resize(data.coffee(), (224, 224), interpolation=cv2.INTER_AREA)
    x = normalize_input(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0]
    assert int(probs.argmax()) == 967  # "espresso"
    assert float(probs[967]) > 0.5


def test_taps_have_the_documented_channels_and_strides():
    assert tap_channels(DEFAULT_TAPS) == [24, 40, 112]
    assert tap_strides(DEFAULT_TAPS) == [4, 8, 16]
    teacher, _ = build_teacher()
    with torch.no_grad():
        feats = teacher(torch.zeros(1, 3, 256, 256))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 64, 64), (40, 32, 32), (112, 16, 16)]
    assert len(teacher.backbone._blocks) == 11  # truncated after the deepest tap


def test_same_padding_is_asymmetric_like_tensorflow():
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    conv.weight.data.fill_(1.0)
    x = torch.ones(1, 1, 4, 4)
    y = conv(x)
    assert y.shape[-2:] == (2, 2)
    # TF pads 0 top/left and 1 bottom/right here: the top-left output sees a full 3x3 of ones
    assert y[0, 0, 0, 0].item() == 9.0
    assert y[0, 0, 1, 1].item() == 4.0
    assert SameConv2d(1, 1, 5, stride=2)(torch.ones(1, 1, 7, 9)).shape[-2:] == (4, 5)


def test_user_weights_file_and_clear_errors(tmp_path: Path, lite0):
    model, _ = lite0
    good = tmp_path / "lite0.pth"
    torch.save(model.state_dict(), good)
    _, sha2 = load_lite0(good)
    assert sha2 != "" and isinstance(sha2, str)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lite0(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_lite0(corrupt)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="do not match EfficientNet-Lite0"):
        load_lite0(wrong)
    with pytest.raises(ValueError, match="taps"):
        build_teacher(taps=(2, 40))


def test_teacher_stays_frozen_in_train_mode():
    teacher, _ = build_teacher()
    teacher.train()
    assert not teacher.training and not teacher.backbone._bn0.training
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        a = teacher(x)[0]
        b = teacher(x)[0]
    torch.testing.assert_close(a, b)
