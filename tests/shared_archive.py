"""Where the test suite reads real CIFAR-10 images: one path for every test file.

The JPEG archive sits in the shared folder beside the repository, as CI lays it out
(``../shared/data/cifar10-jpeg.tar.gz``). ``conftest.py`` refuses to start the suite without it, so
no test that needs real images is ever skipped quietly.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
