"""`syncplane operator --liveness URL`: port 0 means any free port (kopf alone would bind 80)."""

from __future__ import annotations

import socket
import urllib.parse

import pytest

from syncplane.cli import free_port_for


@pytest.mark.parametrize("url", ["http://127.0.0.1:8081/healthz", "http://0.0.0.0:8081/healthz",
                                 "http://127.0.0.1/healthz"])
def test_a_given_port_or_none_is_kept(url):
    assert free_port_for(url) == url


def test_port_0_becomes_a_free_port_of_that_host():
    resolved = urllib.parse.urlsplit(free_port_for("http://127.0.0.1:0/healthz"))
    assert resolved.hostname == "127.0.0.1" and resolved.path == "/healthz"
    assert resolved.port not in (None, 0, 80)
    with socket.socket() as sock:   # free: it can be bound
        sock.bind(("127.0.0.1", resolved.port))
