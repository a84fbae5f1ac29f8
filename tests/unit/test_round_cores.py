"""Which cores a learner round computes on, beside the serving engine or alone."""

from __future__ import annotations

from learner.cli import round_cores


def test_a_round_beside_a_cpu_engine_takes_the_core_the_engine_leaves_free():
    assert round_cores(0, [0, 1], beside_cpu_engine=True) == [1]
    assert round_cores(0, [0, 1, 2, 3], beside_cpu_engine=True) == [3]


def test_a_round_alone_takes_every_usable_core():
    assert round_cores(0, [0, 1], beside_cpu_engine=False) == [0, 1]
    assert round_cores(0, [5], beside_cpu_engine=True) == [5]  # one core: nothing to leave


def test_a_configured_thread_count_wins_counted_from_the_last_core():
    assert round_cores(2, [0, 1, 2, 3], beside_cpu_engine=True) == [2, 3]
    assert round_cores(8, [0, 1], beside_cpu_engine=False) == [0, 1]
