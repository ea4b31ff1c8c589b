"""The cast every view test uses (after healthchecks' alice/bob/charlie).

- alice: student, created group A ("Alpha")
- bob: student, alice's teammate in group A
- carol: student, member of group B ("Bravo")
- dave: student on the roster, in no group
- ines: instructor of the course (staff account)
- anonymous: the test client without a login
"""

import copy
import itertools
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from labs.choices import GroupStatus, ObservedState, Role
from labs.models import Course, Group, Host, Image, Membership, Vm
from labs.people.groups import group_register

# What the PostgreSQL pass leaves to the SQLite pass: folders and files whose subject is
# not the database. The libvirt driver (test:///default, qemu-img, the seed files), the
# browser (pages and scripts), the console's byte paths (websockets, RFB, the tunnel,
# revocation's timing) and the live pages' sockets and renderings. Kept for PostgreSQL:
# everything that claims, locks, counts or constrains rows (operations, placement,
# quotas, the roster, tickets' single use, leases, the outbox, the course clock).
NOT_ABOUT_THE_DATABASE = (
    "drivers",
    "e2e",
    "consoles/test_channels.py",
    "consoles/test_revocation.py",
    "consoles/test_rfb.py",
    "consoles/test_tunnel.py",
    "consoles/test_websockify.py",
    "live/test_consumer.py",
    "live/test_pagecache.py",
    "live/test_regions.py",
)


def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on SQLite and on PostgreSQL: tests marked
    ``sqlite_pass_only`` (slow ones whose subject is not the database, such as killing
    Redis or a worker under a real guest) and the folders and files of
    ``NOT_ABOUT_THE_DATABASE`` run in the SQLite pass only."""
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        return
    skip = pytest.mark.skip(reason="does not depend on the database: run in the SQLite pass")
    here = Path(__file__).parent
    paths = {here / name for name in NOT_ABOUT_THE_DATABASE}
    for item in items:
        if item.get_closest_marker("sqlite_pass_only") or paths & {item.path, *item.path.parents}:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _close_the_async_tests_connection(django_db_setup):
    """Async tests reach the ORM through asgiref's one sync thread, whose connection would
    outlive the run and keep PostgreSQL from dropping the test database (this fixture is
    torn down before django_db_setup, which it depends on)."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=30)


# The page cache's keys of this run (Redis is shared with other runs), in this process and
# in the servers and workers the integration tests start (they inherit the environment).
PAGE_CACHE_PREFIX = os.environ.setdefault(
    "PAGE_CACHE_PREFIX", f"stratus-test-pages-{uuid.uuid4().hex}:"
)


@pytest.fixture(autouse=True)
def _empty_page_cache(monkeypatch):
    """Each test starts with nothing cached (ids and, under time-machine, timestamps
    repeat from one test to the next)."""
    from labs.live import pagecache

    monkeypatch.setattr(pagecache, "PREFIX", PAGE_CACHE_PREFIX)
    pagecache.forget()


@pytest.fixture(autouse=True)
def _private_throttle_counters(monkeypatch):
    """Throttle counters of this test only (Redis is shared with other tests and runs)."""
    from labs import throttle

    monkeypatch.setattr(throttle, "PREFIX", f"stratus-test-throttle-{uuid.uuid4().hex}:")


@pytest.fixture(autouse=True)
def _sign_in_throttle_off(settings):
    """django-axes wants the request in every authenticate(); Django's test client's
    login() passes none. Its lock-outs are tested with it on (tests/test_throttles.py);
    servers the tests start as processes run with it on."""
    settings.AXES_ENABLED = False


@pytest.fixture(autouse=True)
def _live_pushes_at_once(settings):
    """The live regions are rendered and pushed at commit, in the test's thread (a server
    or worker waits LIVE_COALESCE_MS and renders in a thread of its own)."""
    settings.LIVE_COALESCE_MS = 0


@pytest.fixture(autouse=True)
def _private_channel_layer(settings):
    """Console revocations of this test only: Redis is shared with other runs and demos."""
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    layers["default"]["CONFIG"]["prefix"] = f"stratus-test-{uuid.uuid4().hex}"
    settings.CHANNEL_LAYERS = layers  # Channels drops its cached layer on this change


@pytest.fixture(autouse=True)
def _test_driver_uploads(monkeypatch):
    """libvirt's ``test:`` driver keeps volumes as metadata and cannot take an upload
    (VIR_ERR_NO_SUPPORT): for it alone, write the bytes where the volume says it is, so
    tests can read a seed back. Every other connection uploads through the real stream."""
    import libvirt

    from labs.drivers.libvirt import storage

    real = storage.volume_upload

    def upload(conn, volume, data: bytes) -> None:
        if not conn.getURI().startswith("test:"):
            return real(conn, volume, data)
        try:
            real(conn, volume, data)
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            Path(volume.path()).write_bytes(data)

    monkeypatch.setattr(storage, "volume_upload", upload)


@pytest.fixture(scope="session")
def _key_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def make_public_key(_key_dir):
    """Return a function making a fresh real ed25519 public key line (ssh-keygen)."""
    counter = itertools.count()

    def make(comment: str = "") -> str:
        path = _key_dir / f"key{next(counter)}"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
        )
        return path.with_suffix(".pub").read_text()

    return make


@pytest.fixture
def course(db) -> Course:
    return Course.objects.create(slug="os101", title="Operating Systems", term="Fall 2026")


@pytest.fixture
def make_student(course):
    def make(username: str, *, role: str = Role.STUDENT, in_course: Course | None = None):
        user = get_user_model().objects.create_user(
            username=username,
            email=f"{username}@example.edu",
            password=None,
            first_name=username.capitalize(),
            is_staff=role != Role.STUDENT,
        )
        Membership.objects.create(course=in_course or course, user=user, role=role)
        return user

    return make


@pytest.fixture
def alice(make_student):
    return make_student("alice")


@pytest.fixture
def bob(make_student):
    return make_student("bob")


@pytest.fixture
def carol(make_student):
    return make_student("carol")


@pytest.fixture
def dave(make_student):
    return make_student("dave")


@pytest.fixture
def ines(make_student):
    return make_student("ines", role=Role.INSTRUCTOR)


@pytest.fixture
def tara(make_student):
    """A TA of the course: reviews and operates, but raises no quota."""
    return make_student("tara", role=Role.TA)


@pytest.fixture
def otto(make_student, other_course):
    """A TA of another course only: must see nothing of ``course``."""
    return make_student("otto", role=Role.TA, in_course=other_course)


@pytest.fixture
def other_course(db) -> Course:
    return Course.objects.create(slug="net201", title="Networks")


@pytest.fixture
def olga(make_student, other_course):
    """Instructor of another course only: must see nothing of ``course``."""
    return make_student("olga", role=Role.INSTRUCTOR, in_course=other_course)


@pytest.fixture
def make_group(make_public_key):
    """Sign a group up through the service, by ``by`` alone unless members are named."""

    def make(*, course: Course, by, name: str, members: tuple[str, ...] = ()) -> Group:
        return group_register(
            course=course,
            by=by,
            name=name,
            member_usernames=list(members),
            project_title=f"{name}'s project",
            project_idea="An idea.",
            ssh_public_key=make_public_key("group"),
        )

    return make


@pytest.fixture
def group_a(course, alice, bob, make_public_key):
    return group_register(
        course=course,
        by=alice,
        name="Alpha",
        member_usernames=["bob"],
        project_title="A tiny shell",
        project_idea="We write a POSIX shell.",
        ssh_public_key=make_public_key("alpha"),
    )


@pytest.fixture
def group_b(course, carol, make_public_key):
    return group_register(
        course=course,
        by=carol,
        name="Bravo",
        member_usernames=[],
        project_title="A file system",
        project_idea="FUSE file system with snapshots.",
        ssh_public_key=make_public_key("bravo"),
    )


@pytest.fixture
def client_for(client):
    """Log the test client in as a user (force_login) and return it."""

    def login(user):
        client.force_login(user)
        return client

    return login


@pytest.fixture
def make_vm(db):
    """Make a VM row of a group (approving the group) on host h1, running by default.

    No hypervisor is involved: for pages, consumers and services that only read the row.
    """

    def make(group: Group, *, name: str = "vm1", **fields) -> Vm:
        Group.objects.filter(pk=group.pk).update(status=GroupStatus.APPROVED)
        group.status = GroupStatus.APPROVED
        image, _ = Image.objects.get_or_create(
            name="deb", defaults={"os": "Debian 12", "path": "/srv/base.qcow2"}
        )
        host, _ = Host.objects.get_or_create(
            name="h1",
            defaults={"uri": "qemu:///system", "vcpus": 8, "memory_mib": 16384, "disk_gib": 200},
        )
        values = {
            "group": group,
            "name": name,
            "host": host,
            "image": image,
            "vcpus": 1,
            "memory_mib": 1024,
            "disk_gib": 10,
            "observed_state": ObservedState.RUNNING,
            # What its VNC server announces (the consoles' fake servers say "fake").
            "vnc_name": "fake",
            **fields,
        }
        return Vm.objects.create(**values)

    return make


def child_db_env() -> dict[str, str]:
    """Environment for a child process (manage.py, a worker, a server) to use the database
    this test run uses: the SQLite test file, or the PostgreSQL test database."""
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return {"SQLITE_PATH": str(db["NAME"]), "DATABASE_URL": ""}
    return {
        "DATABASE_URL": (
            f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST'] or '127.0.0.1'}:"
            f"{db['PORT'] or 5432}/{db['NAME']}"
        )
    }
