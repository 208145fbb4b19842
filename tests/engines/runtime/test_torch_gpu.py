"""torch CUDA runtime: CUDA graphs + fp16 against the CPU reference. Runs only where torch sees a GPU
(benchmarks/gpu_check.sh runs it on the GPU machine); skipped in CI, which has none."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


@needs_cuda
def test_cuda_graph_fp16_matches_cpu(exported_bundle: Path, synthetic_root: Path):
    from engines.data import eval_items, load_images
    from engines.runtime import load_runtime

    imgs = load_images([it.path for it in eval_items(synthetic_root)[::3]], 128)
    cpu = load_runtime("torch", exported_bundle, device="cpu")
    gpu = load_runtime("torch", exported_bundle, device="cuda")
    assert gpu.fp16 and gpu.cuda_graph
    ref_maps, ref_scores = cpu.predict(imgs, batch_size=4)
    maps, scores = gpu.predict(imgs, batch_size=4)
    # fp16 networks: a looser tolerance on the normalised map than fp32 runtimes get
    np.testing.assert_allclose(maps, ref_maps, atol=0.1)
    np.testing.assert_allclose(scores, ref_scores, atol=0.1)
    # replaying the captured graph with new data gives new results (static buffers refreshed)
    a = gpu(imgs[:4])["score"].copy()
    b = gpu(imgs[4:8])["score"].copy()
    assert not np.allclose(a, b)
    np.testing.assert_allclose(gpu(imgs[:4])["score"], a, atol=1e-6)
    assert 4 in gpu._graphs


@needs_cuda
def test_cuda_eager_fp32_matches_cpu_tightly(exported_bundle: Path, synthetic_root: Path):
    from engines.data import eval_items, load_images
    from engines.runtime import load_runtime

    imgs = load_images([it.path for it in eval_items(synthetic_root)[:4]], 128)
    cpu = load_runtime("torch", exported_bundle, device="cpu")
    gpu = load_runtime("torch", exported_bundle, device="cuda", fp16=False, cuda_graph=False)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    np.testing.assert_allclose(gpu.predict(imgs)[1], cpu.predict(imgs)[1], atol=2e-3)


def test_cpu_torch_runtime_refuses_cuda_graph_without_gpu(exported_bundle: Path):
    from engines.runtime import load_runtime

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        load_runtime("torch", exported_bundle, device="cuda")
