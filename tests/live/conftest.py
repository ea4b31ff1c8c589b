"""The Redis listener of tests/live/test_events.py for the other tests here."""

from tests.live.test_events import listen  # noqa: F401
