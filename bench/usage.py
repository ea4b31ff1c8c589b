"""How long counting a term's usage hours takes: the overview's Usage section and the CSV
(``usage.course_report``), and the group page's line (``usage.group_hours``).

    .venv/bin/python bench/usage.py [--groups 50] [--days 100] [--runs 5]

Builds a throwaway SQLite database in a temporary directory, seeds one course with N
approved groups of two VMs, each VM started by a student and stopped once a day for the
whole term (two state changes a VM a day), a weekly class, and prints the time and the
queries of each read. Nothing is served and nothing leaves the machine.
"""

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--days", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="stratus-bench-usage-")
    os.environ.update(SQLITE_PATH=str(Path(tmp) / "db.sqlite3"), DATABASE_URL="")
    os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from datetime import time as clock_time

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from labs.choices import GroupStatus, ObservedState
    from labs.compute import usage
    from labs.models import ClassSession, Course, Group, Host, Image, Membership, StateChange, Vm

    call_command("migrate", verbosity=0, skip_checks=True)
    start = datetime(2026, 3, 1, tzinfo=UTC)
    now = start + timedelta(days=args.days)
    course = Course.objects.create(slug="bench", title="Bench", hours_quota=400)
    Course.objects.filter(pk=course.pk).update(created_at=start, time_zone="Europe/Berlin")
    course = Course.objects.get(pk=course.pk)
    ClassSession.objects.create(
        course=course, weekday=1, starts_at=clock_time(10), ends_at=clock_time(12)
    )
    host = Host.objects.create(
        name="h", uri="test:///default", vcpus=999, memory_mib=10**6, disk_gib=10**5
    )
    image = Image.objects.create(name="i", os="x", path="/x")
    users = get_user_model()
    rows = []
    for g in range(args.groups):
        group = Group.objects.create(
            course=course,
            name=f"G{g:03d}",
            project_title="p",
            project_idea="i",
            ssh_public_key="k",
            ssh_key_type="ssh-ed25519",
            ssh_key_bits=256,
            ssh_key_fingerprint=f"SHA256:{g}",
            status=GroupStatus.APPROVED,
        )
        student = users.objects.create_user(f"s{g}", password=None)
        Membership.objects.create(course=course, user=student, group=group)
        for v in range(2):
            vm = Vm.objects.create(
                group=group,
                name=f"vm{v}",
                host=host,
                image=image,
                vcpus=1,
                memory_mib=512,
                disk_gib=5,
            )
            for d in range(args.days):
                day = start + timedelta(days=d, hours=8 + v)
                rows.append(
                    StateChange(vm=vm, state=ObservedState.RUNNING, at=day, started_by=student)
                )
                rows.append(
                    StateChange(vm=vm, state=ObservedState.SHUTOFF, at=day + timedelta(hours=5))
                )
    StateChange.objects.bulk_create(rows, batch_size=2000)
    group = Group.objects.filter(course=course).first()
    student = group.memberships.get().user
    print(
        f"{args.groups} groups, {2 * args.groups} VMs, {len(rows)} state changes, {args.days} days"
    )
    reads = {
        "course_report (overview, CSV)": lambda c, g: usage.course_report(course=c, now=now),
        "group_hours (group page)": lambda c, g: usage.group_hours(group=g, user=student, now=now),
    }
    for label, read in reads.items():
        times = []
        for _ in range(args.runs):
            # Fresh rows each run: no schedule cached on the course.
            fresh = Group.objects.select_related("course").get(pk=group.pk)
            with CaptureQueriesContext(connection) as queries:
                began = time.perf_counter()
                read(fresh.course, fresh)
                times.append(time.perf_counter() - began)
        times.sort()
        print(
            f"{label}: median {1000 * times[len(times) // 2]:.1f} ms, "
            f"best {1000 * times[0]:.1f} ms, {len(queries)} queries"
        )


if __name__ == "__main__":
    main()
