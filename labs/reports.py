"""Reports for a course's staff: the usage hours as CSV (the overview shows the same
rows, labs/compute/usage.py ``course_report``)."""

import csv

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.views.decorators.http import require_http_methods

from labs import selectors
from labs.compute import usage

CSV_COLUMNS = ["course", "group", "student", "hours", "vms", "snapshots", "idle_suspensions"]


def _cell(value) -> str:
    """A spreadsheet must not read a group's name as a formula (CSV injection)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@login_required
@require_http_methods(["GET", "HEAD"])
def course_usage_csv(request, slug: str):
    """One row per group (its totals, ``student`` empty) and one per student member (the
    hours they started): course staff only, as the overview (another course's staff and
    students get a 404)."""
    course = selectors.course_for_staff(user=request.user, slug=slug)
    report = usage.course_report(course=course)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{course.slug}-usage.csv"'
    response["Cache-Control"] = "no-store"
    writer = csv.writer(response)
    writer.writerow(CSV_COLUMNS)
    for row in report.rows:
        writer.writerow(
            [
                _cell(v)
                for v in (
                    course.slug,
                    row.group,
                    row.student,
                    f"{row.hours:.2f}",
                    row.vms,
                    row.snapshots,
                    row.idle_suspensions,
                )
            ]
        )
    return response
