"""A published port on a real guest, through the group page's form, a real Celery worker
and QEMU: a web server in the guest answers on the host's loopback at the allocated port
(slirp's ``restrict=on`` lets the forward through, like SSH's), stops answering once
unpublished, is shown closed while the VM is shut down (QEMU is gone) and answers again
after the VM starts (the definition carries the forward). One guest for the module.
Prints the time from the publish POST to the port answering, and the unpublish's
(docs/performance.md)."""

import secrets
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from django.test import Client

from labs.choices import ObservedState, OperationKind, PortState
from labs.compute.requests import vm_operation_request
from labs.models import Operation, Publication

from .conftest import approve_new_group, ssh, wait_for, wait_for_ssh, wait_operation

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

GUEST_PORT = 8080


def serve(key, port: int, token: str) -> None:
    """A web server in the guest on every address, serving ``token`` (backgrounded)."""
    command = (
        f"mkdir -p /tmp/www && echo {token} > /tmp/www/index.html && cd /tmp/www && "
        f"(nohup setsid python3 -m http.server {GUEST_PORT} --bind 0.0.0.0 "
        "> /dev/null 2>&1 < /dev/null &) && sleep 0.2 && echo started"
    )
    result = ssh(key, port, command, timeout=60)
    assert result.stdout.strip() == "started", result.stderr
    ready = f"timeout 2 bash -c '</dev/tcp/127.0.0.1/{GUEST_PORT}'"

    def listening() -> bool:
        try:
            return ssh(key, port, ready, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:  # a loaded host: TCG guests answer slowly
            return False

    wait_for(listening, timeout=90, interval=1, what="the guest's web server")


def fetch(port: int) -> str | None:
    """The page on the host's loopback; None when nothing answers (refused, or reset)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as reply:  # noqa: S310
            return reply.read().decode().strip()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def refused(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3)  # noqa: S310
    except urllib.error.URLError as error:
        return isinstance(error.reason, ConnectionRefusedError)
    return False


def last_op(vm, kind) -> Operation:
    return Operation.objects.filter(vm=vm, kind=kind).latest("pk")


@pytest.mark.sqlite_pass_only  # its rows are the unit suite's, which runs on PostgreSQL
def test_a_published_port_answers_on_the_host_closes_when_unpublished_and_after_a_stop(
    course, alice, ines, qemu_host, debian_template, worker, group_keypair
):
    key, public = group_keypair
    vm, provision = approve_new_group(
        course, by=alice, reviewer=ines, name="Web", public_key=public
    )
    wait_operation(provision, timeout=120)
    wait_for_ssh(key, vm.ssh_port)
    vm.refresh_from_db()
    token = secrets.token_hex(8)
    serve(key, vm.ssh_port, token)

    client = Client()
    client.force_login(alice)
    page = f"/groups/{vm.group_id}/"

    # Publish through the group page's form: the worker adds the forward to the running QEMU.
    asked = time.monotonic()
    reply = client.post(f"/vms/{vm.pk}/ports/publish/", {"guest_port": GUEST_PORT}, follow=True)
    pub = Publication.objects.get(vm=vm)
    assert qemu_host.published_port_min <= pub.host_port <= qemu_host.published_port_max
    assert f"Publishing port {GUEST_PORT} of {vm.name} on port {pub.host_port}" in reply.text
    wait_operation(last_op(vm, OperationKind.PORT_PUBLISH), timeout=60)
    assert wait_for(lambda: fetch(pub.host_port), timeout=20, interval=0.1) == token
    answered = time.monotonic() - asked
    pub.refresh_from_db()
    assert pub.state == PortState.PUBLISHED
    assert f'href="http://127.0.0.1:{pub.host_port}/"' in client.get(page).text
    publish_s = last_op(vm, OperationKind.PORT_PUBLISH).params["timings"]["publish_s"]

    # Unpublish: the host port stops answering at once, and is free again.
    asked = time.monotonic()
    client.post(f"/ports/{pub.pk}/unpublish/")
    wait_operation(last_op(vm, OperationKind.PORT_UNPUBLISH), timeout=60)
    assert wait_for(lambda: refused(pub.host_port), timeout=10, interval=0.1)
    closed = time.monotonic() - asked
    assert not Publication.objects.filter(vm=vm).exists()
    assert f"127.0.0.1:{pub.host_port}" not in client.get(page).text
    unpublish_s = last_op(vm, OperationKind.PORT_UNPUBLISH).params["timings"]["unpublish_s"]

    # Published again, then the VM shut down: nothing listens, the page says closed.
    client.post(f"/vms/{vm.pk}/ports/publish/", {"guest_port": GUEST_PORT})
    wait_operation(last_op(vm, OperationKind.PORT_PUBLISH), timeout=60)
    pub = Publication.objects.get(vm=vm)
    assert wait_for(lambda: fetch(pub.host_port), timeout=20, interval=0.1) == token
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.STOP, by=alice), timeout=90)
    vm.refresh_from_db()
    assert vm.observed_state == ObservedState.SHUTOFF
    assert refused(pub.host_port)
    html = client.get(page).text
    assert f"closed while {vm.name} is not running" in html
    assert f'href="http://127.0.0.1:{pub.host_port}/"' not in html

    # Started again: the domain's definition forwards it from the start.
    wait_operation(vm_operation_request(vm=vm, kind=OperationKind.START, by=alice), timeout=60)
    wait_for_ssh(key, vm.ssh_port)
    serve(key, vm.ssh_port, token)
    assert wait_for(lambda: fetch(pub.host_port), timeout=20, interval=0.2) == token
    assert f'href="http://127.0.0.1:{pub.host_port}/"' in client.get(page).text
    print(
        f"\npublish: POST to the port answering {answered:.2f} s (driver {publish_s:.3f} s); "
        f"unpublish: POST to refused {closed:.2f} s (driver {unpublish_s:.3f} s)"
    )
