"""Shared fixtures: small datasets made on the fly (real files, no mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout dataset (128 px)."""
    from engines.synthetic import make_dataset

    return make_dataset(
        tmp_path_factory.mktemp("synthetic") / "parts",
        n_train=40,
        n_test_good=10,
        n_test_per_defect=5,
        size=128,
    )


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, synthetic_root) -> Path:
    """A tiny model trained on the synthetic set (shared by tests that need a bundle)."""
    from engines.train import TrainConfig, train

    out = tmp_path_factory.mktemp("bundle") / "model"
    cfg = TrainConfig(image_size=128, epochs=6, batch_size=8, seed=0, num_threads=2, device="cpu")
    train(synthetic_root, out, cfg, quiet=True)
    return out


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory, trained_bundle) -> Path:
    """The tiny bundle with model.onnx exported (parity-checked by the export itself)."""
    import shutil

    from engines.export import export_bundle

    out = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(trained_bundle, out)
    export_bundle(out)
    return out
