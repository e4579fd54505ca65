"""Fixtures of the serving tests (helpers live in _serving.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("aiortc")
pytest.importorskip("websockets")
pytest.importorskip("httpx")


@pytest.fixture(scope="session")
def tiny_lite():
    from _tiny import tiny_pipeline

    pipe, _, _ = tiny_pipeline("lite")  # 64x32 output
    return pipe
