"""Fixtures of the compute tests."""

import pytest

from labs.compute import dispatch


@pytest.fixture
def sent(monkeypatch, django_capture_on_commit_callbacks):
    """Deliveries that reach the broker, recorded instead of sent; deliveries after
    commit happen at once, as in autocommit."""
    ids = []
    monkeypatch.setattr(dispatch, "task_send", lambda op_id: ids.append(op_id) or "t-1")
    monkeypatch.setattr(dispatch.transaction, "on_commit", lambda fn, **kw: fn())
    return ids
