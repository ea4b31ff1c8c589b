"""A course's next term: the same setup, no groups (``rollover_course``, the admin action).

Copied: the title, the VM template (image, sizes, quotas), the quota caps, the snapshot
limit, placement, the clock's settings (time zone, lead, after class, idle rule, hours),
the weekly classes (without their first and last weeks, which were last term's) and the
staff (instructors and TAs). Not copied: groups, students, VMs, one-off classes and
holidays (dates of the old term), signup dates, the deadline and the end of term: the
instructor sets those for the new term. ``rolled_over_from`` names the old course.
"""

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from labs.choices import STAFF_ROLES
from labs.errors import Invalid, Refused
from labs.models import ClassSession, Course, Membership, VmTemplate

# Course fields a rollover does not carry over (set for the new term, or Stratus's own).
NOT_COPIED = {
    "id",
    "slug",
    "term",
    "created_at",
    "signup_opens_at",
    "signup_closes_at",
    "deadline_at",
    "deadline_done_at",
    "term_ends_at",
    "term_warned_at",
    "archived_at",
    "rolled_over_from",
}


def course_rollover(
    *, course: Course, slug: str, term: str, by: AbstractBaseUser | None = None
) -> Course:
    """The new course, made in one transaction; Refused when ``slug`` is taken."""
    slug = slug.strip()
    if not slug:
        raise Invalid("The new course needs a slug.")
    if Course.objects.filter(slug=slug).exists():
        raise Refused(f"A course with the slug “{slug}” exists already; choose another.")
    fields = {
        f.name: getattr(course, f.name)
        for f in Course._meta.concrete_fields
        if f.name not in NOT_COPIED
    }
    try:
        with transaction.atomic():
            new = Course(**fields, slug=slug, term=term, rolled_over_from=course)
            new.full_clean()
            new.save()
            template = VmTemplate.objects.filter(course=course).first()
            if template is not None:
                template.pk = None
                template.id = None
                template.course = new
                template._state.adding = True
                template.save()
            for session in ClassSession.objects.filter(course=course, weekday__isnull=False):
                ClassSession.objects.create(
                    course=new,
                    label=session.label,
                    weekday=session.weekday,
                    starts_at=session.starts_at,
                    ends_at=session.ends_at,
                )
            Membership.objects.bulk_create(
                Membership(course=new, user_id=m.user_id, role=m.role)
                for m in Membership.objects.filter(course=course, role__in=STAFF_ROLES)
            )
    except IntegrityError as error:  # the slug taken meanwhile
        raise Refused(
            f"A course with the slug “{slug}” exists already; choose another."
        ) from error
    return new
