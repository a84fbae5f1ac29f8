"""Which cores a learner round computes on."""

from __future__ import annotations

from learner.cli import round_cores


def test_a_round_takes_every_usable_core_by_default():
    assert round_cores(0, [0, 1]) == [0, 1]
    assert round_cores(0, [5]) == [5]


def test_a_configured_thread_count_takes_the_last_cores_the_engine_binds_last():
    assert round_cores(1, [0, 1]) == [1]
    assert round_cores(2, [0, 1, 2, 3]) == [2, 3]
    assert round_cores(8, [0, 1]) == [0, 1]
