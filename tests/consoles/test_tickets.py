"""Console tickets, revocation and the access check the proxy runs before accept()."""

import asyncio
import hashlib
import json

import pytest
import redis
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model

from labs.choices import DesiredState, GroupStatus, ObservedState
from labs.consoles import tickets as consoles
from labs.consoles.rules import ConsoleDenied, VncEndpoint
from labs.consoles.rules import session_end as console_session_end
from labs.consoles.rules import session_start as console_session_start
from labs.consoles.rules import target_for as console_target_for
from labs.models import ConsoleSession, Group, Host, Membership, Vm


@pytest.fixture
def vm_a(group_a, group_b, make_vm) -> Vm:
    make_vm(group_b, name="other")  # group B approved too
    return make_vm(group_a, vnc_host="127.0.0.1", vnc_port=5901)


def _stored(token: str) -> tuple[bytes | None, int]:
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    key = consoles.TICKET_PREFIX + hashlib.sha256(token.encode()).hexdigest()
    return client.get(key), client.ttl(key)


# -- tickets -------------------------------------------------------------------------------


def test_a_ticket_is_256_random_bits_stored_only_as_its_hash(alice, vm_a, settings):
    settings.CONSOLE_TICKET_TTL = 20
    token = consoles.ticket_issue(user=alice, vm=vm_a, session_key="s3ss10nkey", view_only=False)
    other = consoles.ticket_issue(user=alice, vm=vm_a, session_key="s3ss10nkey", view_only=False)
    assert len(token) == 43 and token != other  # token_urlsafe(32)
    raw, ttl = _stored(token)
    assert token.encode() not in raw
    stored = json.loads(raw)
    assert len(stored.pop("mac")) == 64  # HMAC-SHA256, test_a_ticket_written_to_redis_...
    assert stored == {
        "user_id": alice.pk,
        "vm_id": vm_a.pk,
        "session_hash": consoles.session_hash("s3ss10nkey"),
        "view_only": False,
    }
    assert 0 < ttl <= 20


def test_the_session_is_bound_by_a_hash_never_the_key_itself():
    assert consoles.session_hash("abc") == consoles.session_hash("abc")
    assert consoles.session_hash("abc") != consoles.session_hash("abd")
    assert "abc" not in consoles.session_hash("abc")


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_ticket_is_taken_once(alice, vm_a):
    token = await sync_to_async(consoles.ticket_issue)(
        user=alice, vm=vm_a, session_key="k" * 32, view_only=True
    )
    first, second = await asyncio.gather(
        consoles.aticket_consume(token=token), consoles.aticket_consume(token=token)
    )
    tickets = [t for t in (first, second) if t is not None]
    assert tickets == [
        consoles.Ticket(
            user_id=alice.pk,
            vm_id=vm_a.pk,
            session_hash=consoles.session_hash("k" * 32),
            view_only=True,
        )
    ]
    assert await consoles.aticket_consume(token=token) is None
    assert _stored(token)[0] is None


@pytest.mark.asyncio
@pytest.mark.parametrize("token", ["", "x" * 101, "never-issued"])
async def test_unknown_empty_or_oversized_tokens_are_nothing(token):
    assert await consoles.aticket_consume(token=token) is None


# -- revocation ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_revocation_reaches_every_listener_of_the_vm_group():
    layer = get_channel_layer()
    listeners = [await layer.new_channel() for _ in range(2)]
    elsewhere = await layer.new_channel()
    for channel in listeners:
        await layer.group_add(consoles.vm_group(987654), channel)
    await layer.group_add(consoles.vm_group(987655), elsewhere)
    try:
        await sync_to_async(consoles.console_revoke)(vm_id=987654, reason="VM stopped", user_id=7)
        for channel in listeners:
            event = await asyncio.wait_for(layer.receive(channel), 1)
            assert event == {"type": "console.revoke", "reason": "VM stopped", "user_id": 7}
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(layer.receive(elsewhere), 0.3)
    finally:
        for channel in listeners:
            await layer.group_discard(consoles.vm_group(987654), channel)
        await layer.group_discard(consoles.vm_group(987655), elsewhere)


# -- who may open a console now ------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "view_only", "staff"),
    [("alice", False, False), ("bob", False, False), ("ines", False, True), ("ines", True, True)],
)
def test_members_and_course_staff_may_open_the_console(request, vm_a, who, view_only, staff):
    user = request.getfixturevalue(who)
    target = console_target_for(user_id=user.pk, vm_id=vm_a.pk, view_only=view_only)
    assert target.vm_id == vm_a.pk
    assert target.endpoint == VncEndpoint(host="127.0.0.1", port=5901)
    assert target.is_course_staff is staff


def test_a_superuser_may_open_any_console(vm_a):
    root = get_user_model().objects.create_superuser("root", "root@example.edu", None)
    assert console_target_for(user_id=root.pk, vm_id=vm_a.pk, view_only=True).is_course_staff


@pytest.mark.parametrize(
    ("who", "view_only"), [("carol", False), ("dave", False), ("alice", True), ("bob", True)]
)
def test_others_and_view_only_students_are_denied(request, vm_a, who, view_only):
    user = request.getfixturevalue(who)
    with pytest.raises(ConsoleDenied):
        console_target_for(user_id=user.pk, vm_id=vm_a.pk, view_only=view_only)


def test_a_removed_member_an_inactive_user_and_a_missing_vm_are_denied(alice, bob, vm_a):
    Membership.objects.filter(user=bob).update(group=None)
    get_user_model().objects.filter(pk=alice.pk).update(is_active=False)
    for user_id, vm_id in ((bob.pk, vm_a.pk), (alice.pk, vm_a.pk), (alice.pk, vm_a.pk + 1000)):
        with pytest.raises(ConsoleDenied):
            console_target_for(user_id=user_id, vm_id=vm_id, view_only=False)


@pytest.mark.parametrize("status", [GroupStatus.PENDING, GroupStatus.REJECTED])
def test_students_of_a_group_that_is_not_approved_are_denied(alice, ines, vm_a, status):
    Group.objects.filter(pk=vm_a.group_id).update(status=status)
    with pytest.raises(ConsoleDenied):
        console_target_for(user_id=alice.pk, vm_id=vm_a.pk, view_only=False)
    assert console_target_for(user_id=ines.pk, vm_id=vm_a.pk, view_only=False)


@pytest.mark.parametrize(
    "change",
    [
        {"observed_state": ObservedState.SHUTOFF},
        {"observed_state": ObservedState.PAUSED},
        {"desired_state": DesiredState.DELETED},
        {"vnc_host": "", "vnc_port": None},
        {"vnc_port": None},
        {"vnc_host": "10.0.0.5"},
        {"vnc_host": "vnc.example.edu"},
        {"vnc_socket": "run/vnc.sock"},
    ],
)
def test_a_vm_without_a_running_local_vnc_server_is_denied(ines, vm_a, change):
    Vm.objects.filter(pk=vm_a.pk).update(**change)
    with pytest.raises(ConsoleDenied):
        console_target_for(user_id=ines.pk, vm_id=vm_a.pk, view_only=False)


@pytest.mark.parametrize(
    "uri", ["qemu+ssh://stratus@hv2.example.edu/system", "qemu+tls://10.0.0.7/system"]
)
def test_a_vm_on_a_remote_libvirt_host_is_denied(alice, vm_a, uri):
    # Its recorded 127.0.0.1 is the hypervisor's loopback, not ours: never connect there.
    Host.objects.filter(pk=vm_a.host_id).update(uri=uri)
    with pytest.raises(ConsoleDenied):
        console_target_for(user_id=alice.pk, vm_id=vm_a.pk, view_only=False)


def test_a_vm_without_a_host_is_denied(alice, vm_a):
    Vm.objects.filter(pk=vm_a.pk).update(host=None)
    with pytest.raises(ConsoleDenied):
        console_target_for(user_id=alice.pk, vm_id=vm_a.pk, view_only=False)


@pytest.mark.parametrize(
    ("change", "endpoint"),
    [
        ({"vnc_host": "::1"}, VncEndpoint(host="::1", port=5901)),
        ({"vnc_host": "localhost"}, VncEndpoint(host="localhost", port=5901)),
        ({"vnc_socket": "/run/stratus/vm1.vnc"}, VncEndpoint(socket="/run/stratus/vm1.vnc")),
    ],
)
def test_loopback_and_unix_socket_endpoints_are_used(alice, vm_a, change, endpoint):
    Vm.objects.filter(pk=vm_a.pk).update(**change)
    assert (
        console_target_for(user_id=alice.pk, vm_id=vm_a.pk, view_only=False).endpoint == endpoint
    )


def test_a_session_row_is_written_at_start_and_at_end(alice, vm_a):
    session_id = console_session_start(user_id=alice.pk, vm_id=vm_a.pk, view_only=False)
    live = ConsoleSession.objects.get(pk=session_id)
    assert (live.user, live.vm, live.ended_at, live.close_reason) == (alice, vm_a, None, "")
    console_session_end(
        session_id=session_id, bytes_to_vm=5, bytes_from_vm=7, close_reason="r" * 150
    )
    ended = ConsoleSession.objects.get(pk=session_id)
    assert ended.ended_at is not None
    assert (ended.bytes_to_vm, ended.bytes_from_vm, ended.close_reason) == (5, 7, "r" * 100)


# -- signed tickets: a write to Redis cannot mint one ---------------------------------------


def _forged(user, vm, **extra) -> str:
    token = "F" * 43
    fields = {"user_id": user.pk, "vm_id": vm.pk, "session_hash": "", "view_only": False}
    redis.Redis.from_url(django_settings.REDIS_URL).set(
        consoles.TICKET_PREFIX + hashlib.sha256(token.encode()).hexdigest(),
        json.dumps({**fields, **extra}),
        ex=30,
    )
    return token


@pytest.mark.parametrize("extra", [{}, {"mac": "0" * 64}, {"mac": 7}])
def test_a_ticket_written_to_redis_without_the_secret_key_is_nothing(alice, vm_a, extra):
    assert consoles.ticket_consume(token=_forged(alice, vm_a, **extra)) is None


@pytest.mark.asyncio
async def test_a_ticket_written_to_redis_without_the_secret_key_is_nothing_to_the_portal(
    alice, vm_a
):
    token = await sync_to_async(_forged)(alice, vm_a)
    assert await consoles.aticket_consume(token=token) is None


def test_tickets_signed_before_a_secret_key_rotation_still_work(alice, vm_a, settings):
    old_key = settings.SECRET_KEY
    token = consoles.ticket_issue(user=alice, vm=vm_a, session_key="k", view_only=False)
    settings.SECRET_KEY, settings.SECRET_KEY_FALLBACKS = "a-new-secret-" * 4, [old_key]
    ticket = consoles.ticket_consume(token=token)
    assert (ticket.user_id, ticket.vm_id) == (alice.pk, vm_a.pk)


@pytest.mark.parametrize("view_only", [False, True])
def test_a_ta_opens_any_console_of_the_course_and_a_ta_of_another_course_none(
    vm_a, tara, otto, view_only
):
    target = console_target_for(user_id=tara.pk, vm_id=vm_a.pk, view_only=view_only)
    assert target.vm_id == vm_a.pk
    with pytest.raises(ConsoleDenied):
        console_target_for(user_id=otto.pk, vm_id=vm_a.pk, view_only=view_only)
