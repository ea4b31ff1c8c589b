"""Creating courses. Every write to a Course outside the admin goes through here."""

from datetime import datetime

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from labs.models import Course

MAX_GROUP_SIZE_LIMIT = 50  # the course_group_size_range constraint allows 1..50


def course_create(
    *,
    slug: str,
    title: str,
    term: str = "",
    max_group_size: int = 4,
    signup_opens_at: datetime | None = None,
    signup_closes_at: datetime | None = None,
) -> Course:
    """Create a course; raises ValidationError keyed by field when a value is unusable.

    A slug that is already taken is a ValidationError on "slug", also when another
    process creates the same course between the check and the insert.
    """
    course = Course(
        slug=slug.strip(),
        title=title.strip(),
        term=term.strip(),
        max_group_size=max_group_size,
        signup_opens_at=signup_opens_at,
        signup_closes_at=signup_closes_at,
    )
    # The table's check constraints report as errors of the whole course; name the field
    # here so that the caller can say which value to fix.
    errors: dict[str, str] = {}
    if not 1 <= max_group_size <= MAX_GROUP_SIZE_LIMIT:
        errors["max_group_size"] = (
            f"A group has between 1 and {MAX_GROUP_SIZE_LIMIT} members, not {max_group_size}."
        )
    if signup_opens_at and signup_closes_at and signup_closes_at <= signup_opens_at:
        errors["signup_closes_at"] = (
            f"Signup must close after it opens ({signup_closes_at.isoformat()} is not after "
            f"{signup_opens_at.isoformat()})."
        )
    if Course.objects.filter(slug=course.slug).exists():
        errors["slug"] = _slug_taken(course.slug)
    try:
        course.full_clean(exclude=list(errors))
    except ValidationError as error:
        errors.update(error.message_dict)
    if errors:
        raise ValidationError(errors)
    try:
        with transaction.atomic():
            course.save(force_insert=True)
    except IntegrityError:
        if Course.objects.filter(slug=course.slug).exists():
            raise ValidationError({"slug": _slug_taken(course.slug)}, code="duplicate") from None
        raise
    return course


def _slug_taken(slug: str) -> str:
    return f"A course with the slug “{slug}” already exists."
