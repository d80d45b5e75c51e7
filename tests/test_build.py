"""The build and the dispatch: import, info(), backend selection and its errors."""

import subprocess
import sys
import threading

import pytest
import torch

import pykern
from pykern import backends


def test_info_reports_the_build(capsys):
    facts = pykern.info()
    printed = capsys.readouterr().out
    assert facts["pykern"] == pykern.__version__
    assert facts["torch"] == torch.__version__
    assert "cpu" in facts["backends_compiled"]
    assert ("cuda" in facts["backends_compiled"]) == pykern.has_cuda()
    if pykern.has_cuda():
        assert facts["cuda_archs"], "a CUDA build records its architectures"
    for word in ("pykern", "torch", "compiled", "triton", "GPU"):
        assert word in printed


def test_python_m_pykern_info():
    result = subprocess.run(
        [sys.executable, "-m", "pykern", "info"], capture_output=True, text=True, check=True
    )
    assert "compiled cpu" in result.stdout


def test_triton_kernels_ship_inside_the_package(tmp_path):
    # Run away from the repository root, where the source folder itself would be importable.
    code = (
        "import importlib.util, pykern.triton_kernels as tk;"
        "assert tk.__name__ == 'pykern.triton_kernels';"
        "assert importlib.util.find_spec('triton_kernels') is None, 'top-level triton_kernels'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_backend_precedence(monkeypatch):
    monkeypatch.setenv("PYKERN_BACKEND", "triton")
    assert pykern.get_backend() == "triton"
    pykern.set_backend("cuda")
    try:
        assert pykern.get_backend() == "cuda"
        with pykern.use_backend("auto"):
            assert pykern.get_backend() == "auto"
            with pykern.use_backend("triton"):
                assert pykern.get_backend() == "triton"
            assert pykern.get_backend() == "auto"
        assert pykern.get_backend() == "cuda"
    finally:
        backends._global_backend = None


def test_bad_environment_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("PYKERN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="PYKERN_BACKEND must be one of auto, cuda, triton"):
        pykern.get_backend()


def test_cpu_tensors_run_the_cpu_reference_unless_triton_is_interpreted(monkeypatch):
    assert backends.pick(torch.device("cpu"), "op") == "cpu"
    with pykern.use_backend("cuda"):
        assert backends.pick(torch.device("cpu"), "op") == "cpu"
    with pykern.use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backends.pick(torch.device("cpu"), "op") == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
            backends.pick(torch.device("cpu"), "op")


def test_cuda_backend_without_cuda_build_says_how_to_build(monkeypatch):
    monkeypatch.setattr(pykern._ext, "has_cuda", lambda: False)
    with pykern.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="PYKERN_BUILD_CUDA=1"):
            backends.pick(torch.device("cuda"), "permute_copy")
    # auto falls back to Triton on a CUDA tensor when the CUDA kernels are absent
    assert backends.pick(torch.device("cuda"), "permute_copy") == "triton"


def test_unsupported_device_names_the_argument():
    with pytest.raises(ValueError, match="device 'xpu' is not supported"):
        backends.pick(torch.device("xpu"), "op")

    class OnXpu:  # stands in for a tensor on a device this build has no kernels for
        device = torch.device("xpu")
        is_cpu = is_cuda = is_meta = False

    with pytest.raises(ValueError, match="to_channels_last: input is on device 'xpu'"):
        backends.check_device(OnXpu(), "to_channels_last")


# Each autograd Function of the package, run forward under use_backend("triton") (Triton's
# interpreter on CPU tensors) with its gradient taken in another thread, as autograd takes the
# gradient of CUDA tensors on its own device thread: that thread sees no use_backend block.
_GRADIENT_CASES = {
    "attention": lambda x: pykern.functional.scaled_dot_product_attention(x, x, x),
    "conv2d": lambda x: pykern.functional.conv2d(x, torch.ones(2, 3, 3, 3), padding=1),
    "conv_transpose2d": lambda x: pykern.functional.conv_transpose2d(x, torch.ones(3, 2, 2, 2)),
    "batch_norm": lambda x: pykern.functional.batch_norm(x, None, None, training=True),
    "layer_norm": lambda x: pykern.functional.layer_norm(x, (5,)),
    "max_pool2d": lambda x: pykern.functional.max_pool2d(x, 2),
    "avg_pool2d": lambda x: pykern.functional.avg_pool2d(x, 2),
    "global_avg_pool2d": pykern.functional.global_avg_pool2d,
    "to_channels_last": pykern.functional.to_channels_last,
}


@pytest.mark.parametrize("case", list(_GRADIENT_CASES))
def test_gradient_runs_on_the_forwards_backend_in_any_thread(case, monkeypatch):
    pytest.importorskip("triton")
    if not backends.triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    choices = []  # (thread, backend) of every kernel call

    def spy(backend, op):
        choice = cpu_choice(backend, op)
        choices.append((threading.current_thread(), choice))
        return choice

    cpu_choice = backends._cpu_choice
    monkeypatch.setattr(backends, "_cpu_choice", spy)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    with pykern.use_backend("triton"):
        y = _GRADIENT_CASES[case](x)
    assert choices and all(choice == "triton" for _, choice in choices)
    choices.clear()
    worker = threading.Thread(target=lambda: y.sum().backward())
    worker.start()
    worker.join()
    assert x.grad is not None
    in_worker = [choice for thread, choice in choices if thread is worker]
    assert in_worker and all(choice == "triton" for choice in in_worker), in_worker
