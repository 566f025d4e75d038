"""Shared fixtures for the data/VAE/cache tests (imported by tests/test_data_*.py, test_vae.py)."""
import os
import socket
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """6 classes x 8 train (+2 val) images, mixed aspect ratios, 2 truncated train files, tar shards."""
    from usp_scale.data.synthetic import make_synthetic
    root = str(tmp_path_factory.mktemp("synth"))
    info = make_synthetic(root, classes=6, per_class=8, size=48, val_per_class=2, seed=3, max_aspect=1.6,
                          tar_shards=2, corrupt=2)
    info["root"] = root
    return info


@pytest.fixture(scope="session")
def synth_clean(tmp_path_factory):
    """A clean set (no corrupt files): 4 classes x 6 train (+2 val), 40 px square and non-square."""
    from usp_scale.data.synthetic import make_synthetic
    root = str(tmp_path_factory.mktemp("synth_clean"))
    info = make_synthetic(root, classes=4, per_class=6, size=40, val_per_class=2, seed=5, max_aspect=1.4,
                          tar_shards=2)
    info["root"] = root
    return info


def data_cfg(root, **kw):
    from usp_scale.config import DataConfig
    base = dict(root=root, image_size=32, batch_size=4, num_workers=0, loader="torchvision")
    base.update(kw)
    return DataConfig(**base)


def python():
    return sys.executable
