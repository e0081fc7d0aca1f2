"""The image, built once per session by `scripts/image.sh` (the layer cache makes a rebuild after a source change
take seconds)."""

from __future__ import annotations

import pytest

from tests.container.docker import ENABLED, build_image


@pytest.fixture(scope="session")
def image() -> str:
    if not ENABLED:
        pytest.skip("SIE_CONTAINER_TESTS is not 1")
    return build_image()
