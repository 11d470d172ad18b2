"""Shared fixtures: one tiny checkpoint folder in the official layout per test session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from wan.testing.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_ckpt):
    from wan.configs import WAN_CONFIGS
    from wan.text2video import WanT2V

    return WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu")
