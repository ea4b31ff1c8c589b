"""Fixtures for the roster tests (the shared cast lives in tests/conftest.py)."""

import pytest
from django.contrib.auth import get_user_model

from labs.models import Membership
from labs.people.roster import RosterError, roster_import


@pytest.fixture
def import_roster(course):
    """Import CSV text or bytes into the course; returns the RosterReport."""

    def run(data: str | bytes, **options):
        if isinstance(data, str):
            data = data.encode()
        return roster_import(course=course, data=data, **options)

    return run


@pytest.fixture
def roster_errors(import_roster):
    """Import a roster that must fail and return its error lines.

    Also checks that the failed import wrote nothing at all.
    """

    def run(data: str | bytes, **options) -> list[str]:
        users = set(get_user_model().objects.values_list("pk", "email", "first_name"))
        memberships = set(Membership.objects.values_list("pk", "user_id", "role"))
        with pytest.raises(RosterError) as raised:
            import_roster(data, **options)
        assert set(get_user_model().objects.values_list("pk", "email", "first_name")) == users
        assert set(Membership.objects.values_list("pk", "user_id", "role")) == memberships
        assert raised.value.errors, "a RosterError must say what is wrong"
        assert all(error.startswith("line ") for error in raised.value.errors)
        return raised.value.errors

    return run


@pytest.fixture
def roster_error(roster_errors):
    """Import a roster that must fail with exactly one error; returns it."""

    def run(data: str | bytes, **options) -> str:
        errors = roster_errors(data, **options)
        assert len(errors) == 1, errors
        return errors[0]

    return run
