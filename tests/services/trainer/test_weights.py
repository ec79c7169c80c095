"""Which rollout replicas a weight push goes to (``trainer.rollout_discovery``). The push
itself, to two replicas, is in tests/e2e/test_smoke.py."""

from __future__ import annotations

import socket

from services.trainer.weights import rollout_replicas


def test_static_urls_are_the_replicas() -> None:
    urls = ["http://a:8001", "http://b:8001", "http://a:8001"]
    assert rollout_replicas(urls, "static") == ["http://a:8001", "http://b:8001"]


def test_dns_resolves_each_name_to_every_address() -> None:
    assert "http://127.0.0.1:8001" in rollout_replicas(["http://localhost:8001"], "dns")
    assert rollout_replicas(["http://[::1]:8001", "http://127.0.0.1:8001/"], "dns") == [
        "http://[::1]:8001",
        "http://127.0.0.1:8001/",
    ]
    assert rollout_replicas(["http://no-such-replica.invalid:8001"], "dns") == []


def test_dns_of_a_headless_service_gives_one_replica_per_pod() -> None:
    """A headless Service's name resolves to every ready pod (here three answers, one of
    them twice, as a resolver may repeat an address for each socket type)."""
    answers = {
        "rollout": [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 8001)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.9", 8001)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::5", 8001, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 8001)),
        ]
    }

    def resolve(host: str, port: int, type: int) -> list[tuple]:
        assert (port, type) == (8001, socket.SOCK_STREAM)
        return answers[host]

    assert rollout_replicas(["http://rollout:8001"], "dns", resolve) == [
        "http://10.0.0.7:8001",
        "http://10.0.0.9:8001",
        "http://[fd00::5]:8001",
    ]
