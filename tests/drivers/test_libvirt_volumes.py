"""Block volumes in the libvirt driver, against libvirt's own test driver: the disk XML,
domains defined with volumes, and create/attach/detach/delete on a shut-off domain (the
test driver cannot hot-plug: the running guest is tests/integration/)."""

# The shared fixtures are imported from their test module, then named as arguments.
# ruff: noqa: F811

import xml.etree.ElementTree as ET

import pytest

from labs.drivers.base import HypervisorError, VolumeSpec
from labs.drivers.libvirt import migration
from labs.drivers.libvirt.xml import build_domain_xml, volume_disk_xml
from tests.drivers.test_libvirt import host, make_spec, seed  # noqa: F401 - fixtures

DATA = VolumeSpec(file_name="stratus-vm-volume-7.qcow2", serial="sv-0123456789abcdef", size_gib=2)
LOGS = VolumeSpec(file_name="stratus-vm-volume-8.qcow2", serial="sv-fedcba9876543210", size_gib=1)


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - XML this test or libvirt's test driver made


def disks_with_serials(root: ET.Element) -> list[ET.Element]:
    return [d for d in root.iter("disk") if d.findtext("serial")]


def test_a_volume_disk_is_virtio_qcow2_with_its_serial_and_an_explicit_empty_chain():
    disk = parse(volume_disk_xml(DATA, path="/srv/vms/v.qcow2", target="vdb"))
    assert disk.attrib == {"type": "file", "device": "disk"}
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2", "discard": "unmap"}
    assert disk.find("source").attrib == {"file": "/srv/vms/v.qcow2"}
    assert disk.findtext("serial") == "sv-0123456789abcdef"
    assert disk.find("target").attrib == {"dev": "vdb", "bus": "virtio"}
    chain = disk.find("backingStore")
    assert chain is not None and list(chain) == [] and chain.attrib == {}


def test_a_domain_defined_with_volumes_has_them_after_the_system_disk_in_its_storage(make_spec):
    spec = make_spec(volumes=(DATA, LOGS))
    root = parse(build_domain_xml(spec, overlay_path="/s/o.qcow2", seed_path="/s/s.iso"))
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc", "hdc"]
    data, logs = disks_with_serials(root)
    assert data.find("source").get("file") == f"{spec.storage_dir}/{DATA.file_name}"
    assert (data.findtext("serial"), logs.findtext("serial")) == (DATA.serial, LOGS.serial)
    assert all(d.find("backingStore") is not None for d in (data, logs))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("file_name", "../etc/shadow", "file name"),
        ("file_name", "other-volume.qcow2", "file name"),
        ("serial", "", "serial"),
        ("serial", "x" * 21, "serial"),
        ("serial", "a b", "serial"),
        ("size_gib", 0, "size"),
    ],
)
def test_unusable_volume_specs_are_refused(field, value, message):
    values = {"file_name": DATA.file_name, "serial": DATA.serial, "size_gib": 1, field: value}
    with pytest.raises(HypervisorError, match=message):
        VolumeSpec(**values)


def test_a_spec_with_one_serial_twice_is_refused(make_spec):
    with pytest.raises(HypervisorError, match="serials of their own"):
        make_spec(volumes=(DATA, DATA))


def test_create_attach_detach_delete_on_a_shut_off_domain_each_idempotent(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    host.hv.force_off(spec.name)
    for _ in range(2):
        host.hv.volume_create(storage_dir=spec.storage_dir, volume=DATA)
        host.hv.volume_attach(spec.name, storage_dir=spec.storage_dir, volume=DATA)
    assert host.hv.volume_serials(spec.name) == [DATA.serial]
    host.hv.volume_create(storage_dir=spec.storage_dir, volume=LOGS)
    host.hv.volume_attach(spec.name, storage_dir=spec.storage_dir, volume=LOGS)
    root = parse(host.conn.lookupByName(spec.name).XMLDesc(0))
    assert [d.find("target").get("dev") for d in disks_with_serials(root)] == ["vdb", "vdc"]

    for _ in range(2):
        host.hv.volume_detach(spec.name, volume=DATA)
    assert host.hv.volume_serials(spec.name) == [LOGS.serial]
    for _ in range(2):
        host.hv.volume_delete(storage_dir=spec.storage_dir, volume=DATA)
    pool = host.hv._pool_for(spec.storage_dir, create=False)
    assert DATA.file_name not in pool.listVolumes() and LOGS.file_name in pool.listVolumes()


def test_a_volume_file_that_names_a_backing_file_is_refused(host, make_spec):
    spec = make_spec()
    pool = host.hv._pool_for(spec.storage_dir, create=True)
    pool.createXML(
        f"<volume><name>{DATA.file_name}</name><capacity unit='GiB'>1</capacity>"
        f"<target><format type='qcow2'/></target><backingStore><path>{host.base}</path>"
        "<format type='qcow2'/></backingStore></volume>",
        0,
    )
    with pytest.raises(HypervisorError, match="has a backing file"):
        host.hv.volume_create(storage_dir=spec.storage_dir, volume=DATA)


def test_attaching_a_volume_that_is_not_on_the_host_says_so(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    host.hv.force_off(spec.name)
    with pytest.raises(HypervisorError, match="volume stratus-vm-volume-7.qcow2 is missing"):
        host.hv.volume_attach(spec.name, storage_dir=spec.storage_dir, volume=DATA)


def test_a_reset_defines_the_domain_again_with_its_volumes(host, make_spec):
    spec = make_spec(volumes=(DATA,))
    host.hv.volume_create(storage_dir=spec.storage_dir, volume=DATA)
    host.hv.provision(spec, seed_iso=seed())
    host.hv.snapshot_create(spec.name, "s1", with_memory=True)
    host.hv.reset(spec, seed_iso=seed("i-2"))
    assert host.hv.volume_serials(spec.name) == [DATA.serial]
    assert host.hv.snapshot_names(spec.name) == []
    assert DATA.file_name in host.hv._pool_for(spec.storage_dir, create=False).listVolumes()


def test_a_live_move_of_a_vm_with_volumes_is_refused_before_anything_is_made(host, make_spec):
    spec = make_spec(volumes=(DATA,))
    host.hv.volume_create(storage_dir=spec.storage_dir, volume=DATA)
    host.hv.provision(spec, seed_iso=seed())
    with pytest.raises(HypervisorError, match="block volumes attached"):
        migration.move_live(host.hv, None, source=spec, target=spec, seed_iso=b"")
