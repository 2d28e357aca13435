import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora (`../shared/data` beside the repo, or `$LSTMLM_TEST_DATA`).

    Missing data skips the test locally and fails it in CI (`$CI` set).
    """
    root = Path(os.environ.get("LSTMLM_TEST_DATA",
                               Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not root.is_dir():
        message = f"test data not found at {root} (set LSTMLM_TEST_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root
