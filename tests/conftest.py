"""Suite-wide checks that run before any test."""
import pytest

from shared_archive import ARCHIVE


def pytest_sessionstart(session):
    """The tests run on real CIFAR-10 images: stop at once, with what to do, when they are missing."""
    if not ARCHIVE.is_file():
        raise pytest.UsageError(
            f"The test suite reads CIFAR-10 from {ARCHIVE}, but there is no file there. Put the shared "
            "folder (shared/data/cifar10-jpeg.tar.gz, see its README) beside this repository, as CI does, "
            "and run the tests again.")
