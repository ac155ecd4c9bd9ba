"""Fixtures that several test files share."""

import socket

import pytest


@pytest.fixture(scope="module")
def offline():
    """Offline mode for transformers and the hub, and any socket connection fails the test."""
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access to {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so set it too
        mp.setattr(socket.socket, "connect", no_network)
        yield
