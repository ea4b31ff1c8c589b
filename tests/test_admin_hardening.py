"""The admin cannot aim a console or an SSH line elsewhere, nor register a host whose URI
runs a program.

A VM's host, SSH port and VNC endpoint are what its worker observed; the console proxies
connect to that endpoint, so they are read-only even for superusers. A Host's libvirt URI
is limited to the transports Stratus supports (labs/validators.py, validate_libvirt_uri).
"""

import re

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.urls import reverse

from labs.models import Host
from labs.tooling.registration import host_register

ENDPOINT_FIELDS = ["host", "ssh_port", "vnc_host", "vnc_port", "vnc_socket"]


@pytest.fixture
def root(db):
    return get_user_model().objects.create_superuser("root", "root@example.edu", None)


@pytest.fixture
def running_vm(group_a, make_vm):
    return make_vm(
        group_a, name="vm1", ssh_port=22001, vnc_host="127.0.0.1", vnc_port=5901, vnc_socket=""
    )


def management_forms(page: str) -> dict[str, str]:
    """The inline formsets' management fields, as the change page renders them."""
    fields = re.findall(
        r'name="([\w-]+-(?:TOTAL|INITIAL|MIN_NUM|MAX_NUM)_FORMS)"[^>]*value="(\d+)"', page
    )
    return dict(fields)


def test_a_superuser_sees_the_vms_endpoint_but_gets_no_field_to_change_it(
    client_for, root, running_vm
):
    page = client_for(root).get(reverse("admin:labs_vm_change", args=[running_vm.pk]))
    html = page.content.decode()

    assert page.status_code == 200
    for field in ENDPOINT_FIELDS:
        assert not re.search(rf'name="{field}"', html), f"{field} is editable"
    assert "5901" in html and "22001" in html  # shown, as text


def test_a_posted_endpoint_is_ignored_while_the_rest_of_the_vm_saves(
    client_for, root, running_vm, group_b
):
    other = Host.objects.create(
        name="h2", uri="qemu:///system", vcpus=8, memory_mib=8192, disk_gib=100
    )
    client = client_for(root)
    url = reverse("admin:labs_vm_change", args=[running_vm.pk])
    page = client.get(url).content.decode()

    response = client.post(
        url,
        {
            "group": running_vm.group_id,
            "name": "vm1-renamed",
            "image": running_vm.image_id,
            "vcpus": "1",
            "memory_mib": "1024",
            "disk_gib": "10",
            "desired_state": running_vm.desired_state,
            # What an edit would aim elsewhere: another host, port and console.
            "host": other.pk,
            "ssh_port": "22999",
            "vnc_host": "127.0.0.1",
            "vnc_port": "5902",
            "vnc_socket": "/run/libvirt/qemu/other-vm.vnc",
            **management_forms(page),
        },
    )

    assert response.status_code == 302, response.context["adminform"].form.errors
    running_vm.refresh_from_db()
    assert running_vm.name == "vm1-renamed"
    assert (
        running_vm.host.name,
        running_vm.ssh_port,
        running_vm.vnc_host,
        running_vm.vnc_port,
        running_vm.vnc_socket,
    ) == ("h1", 22001, "127.0.0.1", 5901, "")


# --- host URIs ----------------------------------------------------------------------------

SUPPORTED_URIS = [
    "qemu:///system",
    "qemu+ssh://stratus@hv2.example.edu/system?no_tty=1",
    "qemu+ssh://stratus@hv2.example.edu:2222/system?keyfile=/app/.ssh/id_ed25519&no_tty=1",
    "qemu+ssh://hv2.example.edu/system?known_hosts=/app/.ssh/known_hosts&known_hosts_verify=normal",
    "qemu+tls://hv3.example.edu/system",
    "qemu+tls://hv3.example.edu/system?pkipath=/etc/stratus/pki",
    "qemu+tcp://127.0.0.1:16509/system",
    "qemu+tcp://127.0.0.2:16510/system",  # scripts/second-libvirtd.sh
    "test:///default",
    "test:///tmp/stratus-test/node.xml",
]

# (URI, what the message names)
REFUSED_URIS = [
    ("qemu+ext:///system?command=/bin/sh", "does not drive hosts over 'qemu+ext'"),
    ("qemu+ssh://hv2.example.edu/system?command=/tmp/x", "command= chooses a program"),
    ("qemu+ssh://hv2.example.edu/system?netcat=/tmp/nc", "netcat= chooses a program"),
    ("qemu+ssh://hv2.example.edu/system?socket=/tmp/s", "socket= chooses a program"),
    ("qemu+ssh://hv2.example.edu/system?proxy=netcat", "proxy=netcat is not allowed"),
    ("qemu+ssh://hv2/system?known_hosts_verify=ignore", "known_hosts_verify=ignore is not"),
    ("qemu+ssh://hv2.example.edu/system?name=qemu:///session", "name= is not one Stratus"),
    ("qemu+tls://hv3.example.edu/system?no_verify=1", "no_verify= is not one Stratus"),
    ("qemu+unix:///system?socket=/tmp/s", "does not drive hosts over 'qemu+unix'"),
    ("qemu+libssh2://hv2.example.edu/system", "does not drive hosts over 'qemu+libssh2'"),
    ("xen:///system", "does not drive hosts over 'xen'"),
    ("qemu+tcp://hv2.example.edu/system", "only a loopback test daemon"),
    ("qemu+tcp://10.0.0.2/system", "only a loopback test daemon"),
    ("qemu+ssh://stratus:hunter2@hv2.example.edu/system", "carries a password"),
    ("qemu+ssh:///system", "needs the host's name"),
    ("qemu://hv2.example.edu/system", "names no server here"),
    ("qemu:///session", "the path is /system"),
    ("qemu+ssh://hv2.example.edu/", "the path is /system"),
    ("qemu+ssh://hv2.example.edu/system?keyfile=/a\nb", "control characters"),
    ("qemu:///system#x", "#fragment"),
]


def host_form(uri: str) -> dict[str, str]:
    return {
        "name": "hv9",
        "driver": "libvirt",
        "uri": uri,
        "enabled": "on",
        "vcpus": "8",
        "memory_mib": "8192",
        "disk_gib": "100",
        "cpu_overcommit": "4",
        "memory_overcommit": "1",
        "disk_overcommit": "2",
        "virt_type": "auto",
        "network_mode": "user",
        "bridge": "",
        "ssh_address": "127.0.0.1",
        "ssh_port_min": "22000",
        "ssh_port_max": "22999",
        "published_port_min": "23000",
        "published_port_max": "23999",
        "vxlan_port": "4789",
        "storage_dir": "/var/lib/stratus/vms",
    }


@pytest.mark.parametrize("uri", SUPPORTED_URIS)
def test_the_admin_registers_a_host_over_a_supported_transport(client_for, root, uri):
    response = client_for(root).post(reverse("admin:labs_host_add"), host_form(uri))

    assert response.status_code == 302, response.context["adminform"].form.errors
    assert Host.objects.get(name="hv9").uri == uri


@pytest.mark.parametrize(("uri", "message"), REFUSED_URIS)
def test_the_admin_refuses_a_host_uri_stratus_does_not_support(client_for, root, uri, message):
    response = client_for(root).post(reverse("admin:labs_host_add"), host_form(uri))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert message in " ".join(errors["uri"]), errors
    assert not Host.objects.filter(name="hv9").exists()


@pytest.mark.parametrize(("uri", "message"), REFUSED_URIS)
def test_host_register_refuses_the_same_uris_and_keeps_the_host_as_it_was(db, uri, message):
    Host.objects.create(name="hv9", uri="qemu:///system", vcpus=8, memory_mib=8192, disk_gib=100)

    with pytest.raises(ValidationError) as refused:
        host_register(name="hv9", uri=uri, vcpus=16)

    assert message in " ".join(refused.value.message_dict["uri"])
    host = Host.objects.get(name="hv9")
    assert (host.uri, host.vcpus) == ("qemu:///system", 8)


def test_host_register_accepts_a_supported_uri(db):
    host = host_register(
        name="hv9",
        uri="qemu+ssh://stratus@hv2.example.edu/system?no_tty=1",
        vcpus=8,
        memory_mib=8192,
        disk_gib=100,
    )

    assert Host.objects.get(pk=host.pk).uri.startswith("qemu+ssh://stratus@hv2")
