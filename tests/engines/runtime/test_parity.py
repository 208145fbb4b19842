"""torch, ONNX Runtime and OpenVINO (f32) agree on the same real images within stated tolerances."""

from pathlib import Path

import numpy as np
import pytest

from engines.data import eval_items, load_images
from engines.runtime import load_runtime

MAP_ATOL = 1e-3  # on the normalised map (good pixels ~ N(0, 1) per scale)
SCORE_ATOL = 1e-3


@pytest.fixture(scope="module")
def images(synthetic_root: Path) -> np.ndarray:
    items = eval_items(synthetic_root)
    # good and defective parts
    return load_images([it.path for it in items[::4]], 128)


@pytest.fixture(scope="module")
def reference(exported_bundle: Path, images):
    rt = load_runtime("torch", exported_bundle, device="cpu")
    return rt.predict(images)


@pytest.mark.parametrize(
    ("backend", "options"),
    [("onnxruntime", {}), ("onnxruntime", {"threads": 1}), ("openvino", {"precision": "f32"})],
)
def test_backend_matches_torch(exported_bundle: Path, images, reference, backend, options):
    rt = load_runtime(backend, exported_bundle, **options)
    maps, scores = rt.predict(images, batch_size=3)
    ref_maps, ref_scores = reference
    assert maps.shape == ref_maps.shape == (len(images), 128, 128)
    assert maps.dtype == np.float32 and scores.dtype == np.float32
    np.testing.assert_allclose(maps, ref_maps, atol=MAP_ATOL, rtol=0)
    np.testing.assert_allclose(scores, ref_scores, atol=SCORE_ATOL, rtol=0)
    # and the scores mean something: defective parts rank above good ones on average
    assert np.ptp(scores) > 0.1


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_batch_of_one_equals_batch_of_many(exported_bundle: Path, images, backend):
    rt = load_runtime(backend, exported_bundle)
    many = rt(images[:4])
    for i in range(4):
        one = rt(images[i])  # a single HWC image is accepted as a batch of one
        np.testing.assert_allclose(one["anomaly_map"][0], many["anomaly_map"][i], atol=1e-4)
        np.testing.assert_allclose(one["score"][0], many["score"][i], atol=1e-4)
    if backend == "openvino":
        # one static-shape compiled model per batch size met, the most recent few kept
        assert set(rt._compiled) == {1, 4}
        for b in (2, 3, 5, 6):
            assert rt(images[:b])["score"].shape == (b,)
        assert len(rt._compiled) == rt.MAX_COMPILED
        assert list(rt._compiled)[-1] == 6


def test_openvino_bf16_is_opt_in_and_close(exported_bundle: Path, images, reference):
    rt32 = load_runtime("openvino", exported_bundle)
    assert "f32" in rt32.device
    rt16 = load_runtime("openvino", exported_bundle, precision="bf16")
    _, scores = rt16.predict(images)
    # bf16 keeps ~3 significant digits: looser but still close on the score
    np.testing.assert_allclose(scores, reference[1], atol=0.25 * np.ptp(reference[1]))
