"""Shared fixtures: one tiny checkpoint folder in the official layout per test session and task (t2v, i2v, ti2v); the
`gpu` marker and the GPU tier's JSON report (WAN_GPU_REPORT=path: each test's outcome and the numbers it
recorded); the `pinned` marker."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# torch.compile's CPU kernel cache is not keyed by ATEN_CPU_CAPABILITY: kernels cached by a default run fail to build
# under ATEN_CPU_CAPABILITY=default ("'at::vec' has not been declared"). Such a run gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_aten_{os.environ['ATEN_CPU_CAPABILITY']}")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from wan.testing.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_ckpt):
    from wan.configs import WAN_CONFIGS
    from wan.text2video import WanT2V

    return WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu")


@pytest.fixture(scope="session")
def tiny_i2v_ckpt(tmp_path_factory):
    from wan.testing.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny_i2v") / "ckpt", task="i2v-tiny")


@pytest.fixture(scope="session")
def tiny_i2v_pipe(tiny_i2v_ckpt):
    from wan.configs import WAN_CONFIGS
    from wan.image2video import WanI2V

    return WanI2V(WAN_CONFIGS["i2v-tiny"], tiny_i2v_ckpt, device="cpu")


@pytest.fixture(scope="session")
def tiny_ti2v_ckpt(tmp_path_factory):
    from wan.testing.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ti2v") / "ckpt", task="ti2v-tiny")


@pytest.fixture(scope="session")
def tiny_ti2v_pipe(tiny_ti2v_ckpt):
    from wan.configs import WAN_CONFIGS
    from wan.textimage2video import WanTI2V

    return WanTI2V(WAN_CONFIGS["ti2v-tiny"], tiny_ti2v_ckpt, device="cpu")


_GPU_REPORT: dict = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with -m gpu on the GPU machine)")
    config.addinivalue_line("markers", "pinned: checks pinned numbers; CI reruns these under other CPU instruction "
                                       "sets (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY)")


@pytest.fixture
def gpu_record(request):
    """Record numbers for the GPU tier's JSON report: gpu_record(name=value, ...)."""
    entry = _GPU_REPORT.setdefault(request.node.nodeid, {})

    def record(**values):
        entry.update(values)

    return record


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        entry = _GPU_REPORT.setdefault(report.nodeid, {})
        entry.setdefault("outcome", report.outcome)
        if report.outcome != "passed":
            entry["outcome"] = report.outcome
            entry["detail"] = str(report.longrepr)[-600:]
        entry["seconds"] = round(entry.get("seconds", 0) + report.duration, 3)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("WAN_GPU_REPORT")
    if not path:
        return
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "git_commit": os.environ.get("GIT_COMMIT", "unknown"), "exit_status": int(exitstatus)}
    Path(path).write_text(json.dumps({"env": env, "tests": _GPU_REPORT}, indent=1, default=str))
