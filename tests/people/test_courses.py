from datetime import UTC, datetime

import pytest
from django.core.exceptions import ValidationError

from labs.models import Course
from labs.people.courses import course_create

SEPT_1 = datetime(2026, 9, 1, 9, 0, tzinfo=UTC)
SEPT_15 = datetime(2026, 9, 15, 17, 0, tzinfo=UTC)


def field_errors(**values) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as raised:
        course_create(**{"slug": "os101", "title": "Operating Systems", **values})
    return raised.value.message_dict


@pytest.mark.django_db
def test_it_creates_a_course_with_every_field():
    course = course_create(
        slug="os101",
        title="Operating Systems",
        term="Fall 2026",
        max_group_size=3,
        signup_opens_at=SEPT_1,
        signup_closes_at=SEPT_15,
    )

    stored = Course.objects.get(slug="os101")
    assert stored == course
    assert (stored.title, stored.term, stored.max_group_size) == (
        "Operating Systems",
        "Fall 2026",
        3,
    )
    assert (stored.signup_opens_at, stored.signup_closes_at) == (SEPT_1, SEPT_15)


@pytest.mark.django_db
def test_defaults_give_groups_of_four_and_an_always_open_signup():
    course = course_create(slug="os101", title="Operating Systems")

    assert course.max_group_size == 4
    assert course.term == ""
    assert course.is_signup_open


@pytest.mark.django_db
def test_surrounding_spaces_are_dropped():
    course = course_create(slug=" os101 ", title="  Operating Systems ", term=" Fall ")

    assert (course.slug, course.title, course.term) == ("os101", "Operating Systems", "Fall")


@pytest.mark.django_db
def test_a_taken_slug_is_a_clear_error_on_the_slug(course):
    errors = field_errors(slug=course.slug, title="Another course")

    assert errors == {"slug": ["A course with the slug “os101” already exists."]}
    assert Course.objects.count() == 1


@pytest.mark.django_db
def test_a_slug_with_spaces_or_punctuation_is_rejected():
    assert "slug" in field_errors(slug="OS 101!")
    assert not Course.objects.exists()


@pytest.mark.django_db
def test_a_course_needs_a_title():
    assert list(field_errors(title="   ")) == ["title"]


@pytest.mark.django_db
@pytest.mark.parametrize("size", [0, 51])
def test_a_group_size_outside_one_to_fifty_is_an_error_on_that_field(size):
    errors = field_errors(max_group_size=size)

    assert list(errors) == ["max_group_size"]
    assert f"not {size}" in errors["max_group_size"][0]
    assert not Course.objects.exists()


@pytest.mark.django_db
def test_signup_must_close_after_it_opens():
    errors = field_errors(signup_opens_at=SEPT_15, signup_closes_at=SEPT_1)

    assert list(errors) == ["signup_closes_at"]
    assert errors["signup_closes_at"][0].startswith("Signup must close after it opens")


@pytest.mark.django_db
def test_every_bad_field_is_reported_at_once(course):
    errors = field_errors(slug=course.slug, title="", max_group_size=0)

    assert set(errors) == {"slug", "title", "max_group_size"}


@pytest.mark.django_db
def test_an_overlong_term_is_an_error_on_the_term():
    assert list(field_errors(term="x" * 51)) == ["term"]
