"""The admin cannot aim a console or an SSH line elsewhere, nor register a host whose URI
runs a program.

A VM's host, SSH port and VNC endpoint are what its worker observed; the console proxies
connect to that endpoint, so they are read-only even for superusers. A Host's libvirt URI
is limited to the transports Stratus supports (labs/models.py, validate_libvirt_uri).
"""

import re

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from labs.models import Host

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

    assert response.status_code == 302, response.content.decode()[:3000]
    running_vm.refresh_from_db()
    assert running_vm.name == "vm1-renamed"
    assert (
        running_vm.host.name,
        running_vm.ssh_port,
        running_vm.vnc_host,
        running_vm.vnc_port,
        running_vm.vnc_socket,
    ) == ("h1", 22001, "127.0.0.1", 5901, "")
