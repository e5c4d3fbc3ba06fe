from __future__ import annotations

import pytest

from streamproc.kafka.offsets import OffsetTracker


def test_commits_only_the_contiguous_completed_prefix() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.add(offset)
    assert tracker.committable() is None
    tracker.complete(12)
    assert tracker.committable() is None  # 10 and 11 are still open
    tracker.complete(10)
    assert tracker.committable() == 11
    tracker.complete(11)
    assert tracker.committable() == 13
    tracker.mark_committed(13)
    assert tracker.committable() is None
    tracker.complete(13)
    assert tracker.committable() == 14 and tracker.in_flight == 0


def test_gaps_in_offsets_are_fine() -> None:
    tracker = OffsetTracker()
    tracker.add(5)
    tracker.add(9)  # 6-8 were compacted away or are transaction markers
    tracker.complete(9)
    tracker.complete(5)
    assert tracker.committable() == 10


def test_out_of_order_registration_is_a_bug() -> None:
    tracker = OffsetTracker()
    tracker.add(3)
    with pytest.raises(ValueError):
        tracker.add(3)


def test_leads_only_the_oldest_open_offsets_with_none_skipped() -> None:
    tracker = OffsetTracker(10)
    for offset in (10, 11, 12, 15):
        tracker.add(offset)
    assert tracker.leads([10]) and tracker.leads([10, 11, 12, 15])
    assert not tracker.leads([11, 12])  # 10 is open: committing 13 would pass it
    assert not tracker.leads([10, 12]) and not tracker.leads([])
    assert not tracker.leads([10, 11, 12, 15, 16])  # 16 was never registered
    tracker.complete(10)
    assert tracker.leads([11, 12])
