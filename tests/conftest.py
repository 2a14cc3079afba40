"""Shared fixtures: the tiny preset, built once per test session under a private $UAE_HOME."""
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("UAE_HOME", tempfile.mkdtemp(prefix="uae-test-home-"))
os.environ.setdefault("OMP_NUM_THREADS", "2")  # OMP_NUM_THREADS=1 runs the suite (and its subprocesses) at 1 thread
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (subprocesses, torchrun); a few seconds to a minute each")


@pytest.fixture(scope="session")
def tiny_paths():
    from tools import tiny
    return tiny.tiny_paths()


@pytest.fixture()
def tiny_uae(tiny_paths):
    """A fresh tiny UAE (loading takes ~0.3 s once the preset is built)."""
    import runs
    torch.manual_seed(0)
    return runs.load_model(preset="tiny")


@pytest.fixture(scope="session")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 64, 64, generator=g)
