"""IPAM hints: when a replica's port creates read their address guesses instead of taking
them blind (a subnet is crowded for a transaction of that many creates)."""

from __future__ import annotations

from services.network import ipam

SUBNET = "5b0e6c1e-4b8a-4c57-9a4f-0c1d2e3f4a5b"


def _seen(hints: ipam.Hints, free: int, taken: int) -> None:
    for _ in range(free):
        hints.guess_seen(SUBNET, taken=False)
    for _ in range(taken):
        hints.guess_seen(SUBNET, taken=True)


def test_a_subnet_never_guessed_on_is_not_crowded() -> None:
    assert not ipam.Hints().crowded(SUBNET)
    assert not ipam.Hints().crowded(SUBNET, 16)


def test_one_collision_on_a_mostly_free_subnet_is_chance() -> None:
    hints = ipam.Hints()
    _seen(hints, free=60, taken=1)
    assert not hints.crowded(SUBNET)
    assert not hints.crowded(SUBNET, 16)


def test_a_full_subnet_is_crowded_after_a_few_guesses() -> None:
    hints = ipam.Hints()
    _seen(hints, free=0, taken=40)
    assert hints.crowded(SUBNET)


def test_a_big_transaction_reads_its_guesses_sooner_than_a_single_create() -> None:
    hints = ipam.Hints()
    _seen(hints, free=200, taken=20)  # about one address in ten is taken
    assert not hints.crowded(SUBNET)
    assert hints.crowded(SUBNET, 16)


def test_the_estimate_follows_a_subnet_that_emptied() -> None:
    hints = ipam.Hints()
    _seen(hints, free=0, taken=100)
    assert hints.crowded(SUBNET)
    _seen(hints, free=3000, taken=0)
    assert not hints.crowded(SUBNET, 16)
