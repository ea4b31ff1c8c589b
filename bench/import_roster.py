"""How long a 1,000-student roster import takes, and how many queries it makes.

    .venv/bin/python bench/import_roster.py [ROWS]

Runs against a throwaway SQLite database in a temporary directory (migrated first), with
the in-memory email backend so that the invitations are built but not printed or sent.
Imports a generated roster once (all created), again (all unchanged), then a third time
with a tenth of the rows edited (updated), and a dry run of the fresh import.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def roster(rows: int, *, edited_every: int = 0) -> bytes:
    lines = ["username,email,first_name,last_name,role"]
    for n in range(rows):
        first = f"First{n}"
        if edited_every and n % edited_every == 0:
            first += " (edited)"
        role = "ta" if n % 100 == 0 else "student"
        lines.append(f"student{n:05},student{n:05}@example.edu,{first},Last{n},{role}")
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory(prefix="stratus-bench-") as tmp:
        os.environ.pop("DATABASE_URL", None)
        os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
        os.environ["SQLITE_PATH"] = str(Path(tmp) / "bench.sqlite3")
        os.environ["EMAIL_BACKEND"] = "django.core.mail.backends.locmem.EmailBackend"
        os.environ.setdefault("LOG_LEVEL", "WARNING")
        sys.path.insert(0, str(ROOT))

        import django

        django.setup()

        from django.core import mail
        from django.core.management import call_command
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        from labs.people import mail as mail_service
        from labs.people.courses import course_create
        from labs.people.roster import roster_import

        # Time the invitations apart: building 1,000 MIME messages is Python's email
        # package at work, not the import.
        mailing = {"seconds": 0.0}
        invitations = mail_service.invitations

        def timed_invitations(**kwargs) -> int:
            start = time.perf_counter()
            try:
                return invitations(**kwargs)
            finally:
                mailing["seconds"] += time.perf_counter() - start

        mail_service.invitations = timed_invitations

        call_command("migrate", verbosity=0, skip_checks=True)
        course = course_create(slug="bench", title="Benchmark course")
        mail.outbox = []

        def timed(label: str, data: bytes, **options) -> None:
            sent_before = len(mail.outbox)
            mailing["seconds"] = 0.0
            with CaptureQueriesContext(connection) as queries:
                start = time.perf_counter()
                report = roster_import(course=course, data=data, **options)
                seconds = time.perf_counter() - start
            emails = len(mail.outbox) - sent_before
            print(
                f"{label:<26} {seconds:6.3f} s {len(queries):3d} queries  "
                f"created {report.created:4d}, updated {report.updated:4d}, "
                f"unchanged {report.unchanged:4d}; {emails:4d} emails"
                + (f" (building them: {mailing['seconds']:.3f} s)" if emails else "")
            )

        fresh = roster(rows)
        sqlite = connection.Database.sqlite_version
        print(f"roster of {rows} rows, {len(fresh) / 1024:.0f} KiB, SQLite {sqlite}")
        timed("dry run (empty database)", fresh, dry_run=True)
        timed("fresh import", fresh)
        timed("same file again", fresh)
        timed("1 row in 10 edited", roster(rows, edited_every=10))


if __name__ == "__main__":
    main()
