"""Shared pytest fixtures.

The sample data lives next to the repository, in ``../shared/data`` (see its README.md); tests
that need it are skipped when it is missing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from anywhere without installing the package
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True)
def _isolated_instseg_logger():
    """Give every test the "instseg" logger as it was before: the tools' ``setup_logging`` adds
    handlers (stdout, OUTPUT_DIR/log.txt) and turns propagation off, which would hide later tests'
    log records from ``caplog`` and keep log files open."""
    import logging

    log = logging.getLogger("instseg")
    handlers, propagate, level = list(log.handlers), log.propagate, log.level
    yield
    for h in [h for h in log.handlers if h not in handlers]:
        log.removeHandler(h)
        h.close()
    log.handlers[:] = handlers
    log.propagate, log.level = propagate, level


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``Path`` of ``../shared/data`` (relative to the repository root); skips when missing."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared sample data not found at {path}")
    return path


@pytest.fixture(scope="session")
def coco128(shared_data: Path) -> Path:
    """``Path`` of the coco128-seg sample (``annotations*.json``, ``images/``); skips when missing."""
    path = shared_data / "coco128-seg"
    if not (path / "annotations.json").is_file():
        pytest.skip(f"coco128-seg not found at {path}")
    return path


#: Three coco128-seg images of different sizes (640x480, 640x426, 640x428).
COCO128_THREE = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]


@pytest.fixture(scope="module")
def coco128_three_images(coco128, tmp_path_factory) -> list:
    """Copies (in a temporary folder, so tools may write beside them) of :data:`COCO128_THREE`."""
    import shutil

    dst = tmp_path_factory.mktemp("coco128_three")
    for name in COCO128_THREE:
        shutil.copy(coco128 / "images" / name, dst / name)
    return [dst / n for n in COCO128_THREE]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped (with a reason) where no CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
