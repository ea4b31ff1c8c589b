"""The libvirt driver, against libvirt's own test driver (a real driver, not a mock).

Every test opens a fresh driver (``test:///<tmp>/node.xml``) so tests share no state. The
test driver keeps storage volumes as metadata only, so the "base image" is a volume made
through the API, and it never runs a guest: booting real guests is the integration tests'
job (see docs/hypervisor.md).
"""

import os
import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace
from types import SimpleNamespace

import libvirt
import pytest

from labs.drivers import cloudinit
from labs.drivers.base import (
    ConsoleEndpoint,
    DomainMissing,
    DomainState,
    HypervisorError,
    HypervisorUnavailable,
    VmSpec,
)
from labs.drivers.libvirt import LibvirtDriver
from labs.drivers.libvirt import errors as libvirt_errors
from labs.drivers.libvirt import xml as domain_xml
from labs.drivers.libvirt.xml import build_domain_xml

QEMU = "{http://libvirt.org/schemas/domain/qemu/1.0}"
STRATUS = f"{{{domain_xml.STRATUS_NS}}}"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHo7lbC0mAaLTrL9cpUSNEKKzQsuEcsLtjzJX/XYbT0x alpha"
HOSTILE = "<script>alert('x')</script> & \"quotes\" ünïcødé 雪 🚀 ]]> <!-- -->"


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - XML this test or libvirt's test driver made


def seed(instance_id: str = "i-1") -> bytes:
    return cloudinit.seed_build(
        instance_id=instance_id,
        hostname="alpha-vm1",
        login_user="student",
        extra_users=["alice"],
        ssh_public_key=KEY,
    )


@pytest.fixture
def host(tmp_path):
    """A fresh test-driver host with an operator's image pool holding a 2 GiB base image."""
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    images, vms = tmp_path / "images", tmp_path / "vms"
    images.mkdir()
    vms.mkdir()  # the test driver's pool build does not make directories
    uri = f"test://{node}"
    hv = LibvirtDriver(uri, host_name="h1")
    # The adapter's own cached connection: each open of test:///<file> is a fresh copy.
    conn = hv._conn
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>images</name><target><path>{images}</path></target></pool>"
    )
    pool.create(0)
    pool.createXML(
        "<volume><name>debian-12.qcow2</name><capacity unit='GiB'>2</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )
    yield SimpleNamespace(
        hv=hv,
        conn=conn,
        uri=uri,
        images=str(images),
        vms=str(vms),
        base=f"{images}/debian-12.qcow2",
    )
    hv.close()


@pytest.fixture
def make_spec(host):
    def make(number: int = 1, **overrides) -> VmSpec:
        values = {
            "name": f"stratus-vm-{number}",
            "uuid": str(uuid.uuid4()),
            "title": f"Alpha / vm{number}",
            "description": "Stratus VM of group Alpha",
            "vcpus": 1,
            "memory_mib": 512,
            "disk_gib": 4,
            "base_image": host.base,
            "storage_dir": host.vms,
            "virt_type": "qemu",
            "ssh_port": 22000 + number,
            "metadata": {"vm": str(number), "group": "7"},
        }
        values.update(overrides)
        return VmSpec(**values)

    return make


def volumes(host) -> list[str]:
    """Names of the volumes in the VM storage directory's pool (whatever its name)."""
    for pool in host.conn.listAllStoragePools(0):
        if parse(pool.XMLDesc(0)).findtext("target/path") == host.vms:
            pool.refresh(0)
            return sorted(pool.listVolumes())
    return []


def live_xml(host, name: str) -> ET.Element:
    return parse(host.conn.lookupByName(name).XMLDesc(0))


def define_raw(host, name: str, graphics: dict[str, str] | None = None) -> None:
    """A domain not made by the adapter, with the given VNC graphics attributes (the test
    driver leaves autoport at -1, so tests that need a port give it here)."""
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "128"
    ET.SubElement(ET.SubElement(domain, "os"), "type", arch="x86_64", machine="pc").text = "hvm"
    devices = ET.SubElement(domain, "devices")
    if graphics is not None:
        listen = graphics.pop("listen_element")
        element = ET.SubElement(devices, "graphics", type="vnc", **graphics)
        ET.SubElement(element, "listen", **listen)
    host.conn.defineXML(ET.tostring(domain, encoding="unicode"))


# --- domain XML ------------------------------------------------------------------------------


def test_hostile_title_description_and_metadata_stay_well_formed_and_round_trip(make_spec):
    spec = make_spec(
        title=f"{HOSTILE}\nsecond line\x00\x07",
        description=f"{HOSTILE}\nline two\x1b",
        metadata={"group": HOSTILE, "note": "a\x00b"},
    )
    root = parse(build_domain_xml(spec, overlay_path="/s/o.qcow2", seed_path="/s/s.iso"))

    assert root.findtext("title") == f"{HOSTILE} second line"
    assert root.findtext("description") == f"{HOSTILE}\nline two"
    entries = {e.get("key"): e.text for e in root.iter(f"{STRATUS}entry")}
    assert entries == {"group": HOSTILE, "note": "ab"}


def test_hostile_text_survives_a_round_trip_through_libvirt(host, make_spec):
    spec = make_spec(title=HOSTILE, description=HOSTILE, metadata={"group": HOSTILE})
    host.hv.provision(spec, seed_iso=seed())

    dom = host.conn.lookupByName(spec.name)
    root = parse(dom.XMLDesc(0))
    assert root.findtext("title") == HOSTILE
    assert root.findtext("description") == HOSTILE
    stored = parse(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domain_xml.STRATUS_NS, 0))
    assert [(e.get("key"), e.text) for e in stored] == [("group", HOSTILE)]


def test_an_empty_title_and_description_are_left_out_not_sent_empty(host, make_spec):
    spec = make_spec(title=" \x00 ", description="")
    root = parse(build_domain_xml(spec, overlay_path="/o", seed_path="/s"))
    assert root.find("title") is None
    assert root.find("description") is None

    host.hv.provision(spec, seed_iso=seed())  # libvirt's schema refuses an empty <title/>
    assert host.hv.state(spec.name) == "running"


def test_domain_xml_boots_the_overlay_with_the_seed_on_ide_and_vnc_on_its_own_socket(make_spec):
    spec = make_spec()
    root = parse(build_domain_xml(spec, overlay_path="/s/o.qcow2", seed_path="/s/s.iso"))

    assert root.get("type") == "qemu"
    assert root.find("cpu") is None  # TCG: QEMU's default CPU model
    assert root.find("os/type").get("machine") == "pc"
    assert root.find("os/boot").get("dev") == "hd"
    assert root.findtext("on_crash") == "destroy"
    disk, cdrom = root.findall("devices/disk")
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2", "discard": "unmap"}
    assert disk.find("source").get("file") == "/s/o.qcow2"
    base = disk.find("backingStore/source")
    assert base.get("file") == spec.base_image
    assert base.find("seclabel").attrib == {"model": "dac", "relabel": "no"}
    assert cdrom.get("device") == "cdrom"
    assert cdrom.find("target").attrib == {"dev": "hdc", "bus": "ide"}
    assert cdrom.find("readonly") is not None
    assert cdrom.find("source").get("file") == "/s/s.iso"
    # A unix socket of the domain's own (libvirt picks the path), no TCP port at all, and
    # no client can make QEMU drop the other viewers.
    graphics = root.find("devices/graphics")
    assert graphics.attrib == {"type": "vnc", "sharePolicy": "force-shared"}
    assert [listen.attrib for listen in graphics.findall("listen")] == [{"type": "socket"}]
    assert root.find("devices/video/model").get("type") == "vga"
    channel = root.find("devices/channel/target")
    assert channel.get("name") == "org.qemu.guest_agent.0"
    assert root.find("devices/memballoon").get("model") == "virtio"
    assert root.find("devices/console").get("type") == "pty"


def test_kvm_domains_use_the_host_cpu_model(make_spec):
    root = parse(build_domain_xml(make_spec(virt_type="kvm"), overlay_path="/o", seed_path="/s"))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-model"


def test_user_mode_networking_is_restricted_and_forwards_ssh_on_loopback_only(make_spec):
    xml = build_domain_xml(
        make_spec(ssh_port=22017, mac="52:54:00:ab:cd:ef"), overlay_path="/o", seed_path="/s"
    )
    root = parse(xml)

    args = [arg.get("value") for arg in root.findall(f"{QEMU}commandline/{QEMU}arg")]
    assert args == [
        "-netdev",
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:22017-:22",
        "-device",
        "virtio-net-pci,netdev=net0,bus=pci.0,addr=0x10,mac=52:54:00:ab:cd:ef",
    ]
    assert root.find("devices/interface") is None  # no libvirt network, no bridge
    assert "0.0.0.0" not in xml  # noqa: S104 - asserting it is absent


def test_bridge_mode_gets_a_virtio_interface_and_no_qemu_commandline(make_spec):
    spec = make_spec(network="bridge", bridge="br-lab", ssh_port=None, mac="52:54:00:00:00:01")
    xml = build_domain_xml(spec, overlay_path="/o", seed_path="/s")
    root = parse(xml)

    interface = root.find("devices/interface")
    assert interface.get("type") == "bridge"
    assert interface.find("source").get("bridge") == "br-lab"
    assert interface.find("model").get("type") == "virtio"
    assert interface.find("mac").get("address") == "52:54:00:00:00:01"
    assert root.find(f"{QEMU}commandline") is None
    assert "hostfwd" not in xml


# --- spec validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "vm-1",  # without the stratus- prefix states() would never see it
        "Stratus-vm-1",
        "stratus_vm_1",
        "stratus-vm 1",
        "stratus-vm/../../etc",
        "stratus-vm-1<x>",
        "stratus-" + "a" * 60,
        "",
    ],
)
def test_it_rejects_domain_names_libvirt_or_a_shell_could_misread(make_spec, name):
    with pytest.raises(HypervisorError, match="name"):
        make_spec(name=name)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("uuid", "not-a-uuid", "UUID"),
        ("virt_type", "auto", "virt type"),
        ("network", "nat", "network"),
        ("ssh_port", 22, "SSH port"),
        ("base_image", "images/debian.qcow2", "absolute"),
        ("storage_dir", "", "absolute"),
        ("vcpus", 0, "vcpus"),
        ("memory_mib", 64, "memory"),
        ("disk_gib", 0, "disk"),
        ("mac", "52:54:00:zz:00:01", "MAC"),
        ("metadata", {"bad key": "x"}, "metadata key"),
    ],
)
def test_it_rejects_unusable_specs_with_a_readable_reason(make_spec, field, value, message):
    with pytest.raises(HypervisorError, match=message):
        make_spec(**{field: value})


def test_bridge_mode_needs_a_bridge_name(make_spec):
    with pytest.raises(HypervisorError, match="bridge"):
        make_spec(network="bridge", bridge="")


# --- provisioning ----------------------------------------------------------------------------


def test_provision_creates_disk_seed_and_a_running_domain_reporting_each_step(host, make_spec):
    spec = make_spec()
    steps = []
    host.hv.provision(spec, seed_iso=seed(), progress=steps.append)

    assert steps == [
        "checking the base image",
        "preparing storage",
        "creating disk",
        "writing cloud-init seed",
        "defining VM",
        "starting VM",
    ]
    assert host.hv.state(spec.name) == "running"
    assert volumes(host) == ["stratus-vm-1-seed.iso", "stratus-vm-1.qcow2"]
    overlay = host.conn.storageVolLookupByPath(f"{host.vms}/stratus-vm-1.qcow2")
    assert overlay.info()[1] == 4 * 1024**3
    assert parse(overlay.XMLDesc(0)).findtext("backingStore/path") == host.base
    assert host.conn.lookupByName(spec.name).UUIDString() == spec.uuid


def test_provision_uploads_the_seed_it_was_given(host, make_spec):
    host.hv.provision(make_spec(), seed_iso=seed("i-42"))

    with open(f"{host.vms}/stratus-vm-1-seed.iso", "rb") as handle:
        files = cloudinit.seed_read(handle.read())
    assert '"instance-id": "i-42"' in files["meta-data"]


def test_provision_twice_leaves_one_domain_one_overlay_one_seed(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    host.hv.provision(spec, seed_iso=seed())

    assert list(host.hv.states()) == [spec.uuid]
    assert volumes(host) == ["stratus-vm-1-seed.iso", "stratus-vm-1.qcow2"]
    assert host.hv.state(spec.name) == "running"


def test_provision_starts_an_existing_stopped_vm(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    host.hv.force_off(spec.name)

    host.hv.provision(spec, seed_iso=seed())

    assert host.hv.state(spec.name) == "running"


def test_a_retried_provision_finishes_what_an_interrupted_one_left(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed("i-1"))
    # As if the first attempt died after writing a half seed, before defining the domain.
    host.conn.lookupByName(spec.name).destroy()
    host.conn.lookupByName(spec.name).undefine()
    with open(f"{host.vms}/{spec.seed_name}", "wb") as handle:
        handle.write(b"\0" * 100)

    host.hv.provision(spec, seed_iso=seed("i-2"))

    assert host.hv.state(spec.name) == "running"
    assert volumes(host) == ["stratus-vm-1-seed.iso", "stratus-vm-1.qcow2"]
    with open(f"{host.vms}/{spec.seed_name}", "rb") as handle:
        assert '"instance-id": "i-2"' in cloudinit.seed_read(handle.read())["meta-data"]


def test_provision_refuses_a_vm_of_the_same_name_with_another_uuid(host, make_spec):
    host.hv.provision(make_spec(), seed_iso=seed())
    volumes_before = volumes(host)
    other = make_spec()  # same name, new uuid

    with pytest.raises(HypervisorError, match="already has a VM named stratus-vm-1") as raised:
        host.hv.provision(other, seed_iso=seed())

    assert not isinstance(raised.value, HypervisorUnavailable)
    assert list(host.hv.states()) != [other.uuid]
    assert volumes(host) == volumes_before


def test_a_missing_base_image_is_a_permanent_error_naming_the_path(host, make_spec):
    missing = f"{host.images}/debian-13.qcow2"
    with pytest.raises(HypervisorError) as raised:
        host.hv.provision(make_spec(base_image=missing), seed_iso=seed())

    assert not isinstance(raised.value, HypervisorUnavailable)
    assert str(raised.value) == f"base image {missing} is missing on host h1"
    assert host.hv.states() == {}
    assert volumes(host) == []


def test_a_base_image_in_a_missing_directory_is_reported_missing(host, make_spec, tmp_path):
    missing = f"{tmp_path}/nowhere/debian-12.qcow2"

    with pytest.raises(HypervisorError, match=f"base image {missing} is missing on host h1"):
        host.hv.provision(make_spec(base_image=missing), seed_iso=seed())
    assert host.hv.states() == {}


def test_a_disk_smaller_than_the_base_image_is_refused(host, make_spec):
    with pytest.raises(HypervisorError, match="smaller than base image"):
        host.hv.provision(make_spec(disk_gib=1), seed_iso=seed())
    assert volumes(host) == []


# --- state -----------------------------------------------------------------------------------


def test_states_reports_every_stratus_vm_by_uuid_and_ignores_other_domains(host, make_spec):
    first, second = make_spec(1), make_spec(2)
    host.hv.provision(first, seed_iso=seed())
    host.hv.provision(second, seed_iso=seed())
    host.hv.force_off(second.name)
    define_raw(host, "mail-server")

    assert host.hv.states() == {
        first.uuid: DomainState(first.uuid, "stratus-vm-1", "running"),
        second.uuid: DomainState(second.uuid, "stratus-vm-2", "shutoff"),
    }


def test_adapters_for_one_uri_share_one_connection(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())

    # test:///<file> gives every *open* a fresh copy, so this sees the VM only if shared.
    assert list(LibvirtDriver(host.uri, host_name="h1").states()) == [spec.uuid]
    host.hv.close()
    assert LibvirtDriver(host.uri, host_name="h1").states() == {}


# --- lifecycle -------------------------------------------------------------------------------


def test_starting_a_running_vm_and_stopping_a_stopped_vm_change_nothing(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())

    host.hv.start(spec.name)
    assert host.hv.state(spec.name) == "running"
    host.hv.force_off(spec.name)
    host.hv.force_off(spec.name)
    assert host.hv.state(spec.name) == "shutoff"
    assert host.hv.shutdown(spec.name, timeout=1) is True
    assert host.hv.state(spec.name) == "shutoff"


def test_shutdown_reports_a_clean_power_off(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())

    assert host.hv.shutdown(spec.name, timeout=5) is True
    assert host.hv.state(spec.name) == "shutoff"


def test_start_resumes_a_paused_vm(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    host.conn.lookupByName(spec.name).suspend()
    assert host.hv.state(spec.name) == "paused"

    host.hv.start(spec.name)

    assert host.hv.state(spec.name) == "running"


def test_rebooting_a_stopped_vm_starts_it(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    host.hv.force_off(spec.name)

    host.hv.reboot(spec.name)

    assert host.hv.state(spec.name) == "running"


@pytest.mark.parametrize(
    "call",
    [
        lambda hv: hv.start("stratus-vm-404"),
        lambda hv: hv.state("stratus-vm-404"),
        lambda hv: hv.shutdown("stratus-vm-404"),
        lambda hv: hv.reboot("stratus-vm-404"),
        lambda hv: hv.force_off("stratus-vm-404"),
        lambda hv: hv.console("stratus-vm-404"),
        lambda hv: hv.snapshot_names("stratus-vm-404"),
    ],
)
def test_operations_on_a_vm_the_host_does_not_have_raise_domain_missing(host, call):
    with pytest.raises(DomainMissing, match="stratus-vm-404 does not exist on host h1"):
        call(host.hv)


# --- snapshots -------------------------------------------------------------------------------


def test_snapshots_can_be_taken_listed_reverted_and_deleted(host, make_spec):
    spec, hv = make_spec(), host.hv
    hv.provision(spec, seed_iso=seed())

    hv.snapshot_create(spec.name, "running-1", with_memory=True)
    hv.snapshot_create(spec.name, "running-1", with_memory=True)  # a retry: no-op
    hv.force_off(spec.name)
    hv.snapshot_create(spec.name, "off-1", with_memory=False)
    assert hv.snapshot_names(spec.name) == ["off-1", "running-1"]

    hv.snapshot_revert(spec.name, "running-1")
    assert hv.state(spec.name) == "running"  # memory snapshots come back running
    hv.snapshot_revert(spec.name, "off-1")
    assert hv.state(spec.name) == "shutoff"  # disk-only ones come back off
    hv.snapshot_revert(spec.name, "off-1", start_after=True)
    assert hv.state(spec.name) == "running"

    hv.snapshot_delete(spec.name, "running-1")
    hv.snapshot_delete(spec.name, "running-1")  # already gone: no-op
    hv.snapshot_delete("stratus-vm-404", "running-1")  # VM gone: nothing to delete
    assert hv.snapshot_names(spec.name) == ["off-1"]


def test_a_disk_only_snapshot_of_a_running_vm_is_refused_with_what_to_do(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())

    with pytest.raises(HypervisorError, match="Shut it down first"):
        host.hv.snapshot_create(spec.name, "disk-only", with_memory=False)
    assert host.hv.snapshot_names(spec.name) == []


def test_reverting_to_a_snapshot_that_does_not_exist_says_so(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())

    with pytest.raises(HypervisorError, match="has no snapshot named before-lab"):
        host.hv.snapshot_revert(spec.name, "before-lab")


@pytest.mark.parametrize("snapshot", ["", "a/b", "two words", "x" * 65, "<x>"])
def test_snapshot_names_libvirt_could_misread_are_refused(host, make_spec, snapshot):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())

    with pytest.raises(HypervisorError, match="invalid snapshot name"):
        host.hv.snapshot_create(spec.name, snapshot, with_memory=True)


# --- reset and delete ------------------------------------------------------------------------


def test_delete_leaves_no_domain_volume_or_snapshot_and_can_be_repeated(host, make_spec):
    spec, keep = make_spec(1), make_spec(2)
    host.hv.provision(spec, seed_iso=seed())
    host.hv.provision(keep, seed_iso=seed())
    host.hv.snapshot_create(spec.name, "s1", with_memory=True)

    host.hv.delete(spec)
    host.hv.delete(spec)

    assert list(host.hv.states()) == [keep.uuid]
    with pytest.raises(DomainMissing):
        host.hv.snapshot_names(spec.name)
    assert volumes(host) == ["stratus-vm-2-seed.iso", "stratus-vm-2.qcow2"]
    assert host.conn.storageVolLookupByPath(host.base)  # the base image is never touched


def test_delete_refuses_a_vm_of_the_same_name_that_is_not_this_one(host, make_spec):
    host.hv.provision(make_spec(), seed_iso=seed())

    with pytest.raises(HypervisorError, match="another id"):
        host.hv.delete(make_spec())
    assert host.hv.state("stratus-vm-1") == "running"


def test_reset_brings_back_a_fresh_vm_with_the_same_uuid_and_no_snapshots(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed("i-1"))
    host.hv.snapshot_create(spec.name, "s1", with_memory=True)
    host.hv.force_off(spec.name)

    host.hv.reset(spec, seed_iso=seed("i-2"))

    assert host.hv.states() == {spec.uuid: DomainState(spec.uuid, spec.name, "running")}
    assert host.hv.snapshot_names(spec.name) == []
    assert volumes(host) == ["stratus-vm-1-seed.iso", "stratus-vm-1.qcow2"]
    with open(f"{host.vms}/{spec.seed_name}", "rb") as handle:
        assert '"instance-id": "i-2"' in cloudinit.seed_read(handle.read())["meta-data"]


def test_a_reset_onto_a_missing_base_image_keeps_the_vm_it_had(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    host.hv.snapshot_create(spec.name, "s1", with_memory=True)

    with pytest.raises(HypervisorError, match="is missing on host h1"):
        host.hv.reset(replace(spec, base_image=f"{host.images}/gone.qcow2"), seed_iso=seed())

    assert host.hv.state(spec.name) == "running"
    assert host.hv.snapshot_names(spec.name) == ["s1"]
    assert volumes(host) == ["stratus-vm-1-seed.iso", "stratus-vm-1.qcow2"]


def test_reset_applies_a_changed_spec_but_keeps_the_identity(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())

    host.hv.reset(replace(spec, memory_mib=1024), seed_iso=seed("i-2"))

    root = live_xml(host, spec.name)
    assert root.findtext("uuid") == spec.uuid
    assert int(root.findtext("memory")) == 1024 * 1024  # KiB


# --- console ---------------------------------------------------------------------------------


def test_console_reads_the_vnc_port_from_the_live_xml(host):
    define_raw(
        host,
        "stratus-vm-9",
        {
            "port": "5907",
            "autoport": "no",
            "listen": "127.0.0.1",
            "listen_element": {"type": "address", "address": "127.0.0.1"},
        },
    )
    host.hv.start("stratus-vm-9")

    assert host.hv.console("stratus-vm-9") == ConsoleEndpoint(
        "tcp", host="127.0.0.1", port=5907, desktop_name="QEMU (stratus-vm-9)"
    )


def test_console_reads_a_unix_socket_from_the_live_xml(host):
    sock = "/var/lib/libvirt/qemu/domain-1-stratus-vm-9/vnc.sock"
    define_raw(
        host,
        "stratus-vm-9",
        {"socket": sock, "listen_element": {"type": "socket", "socket": sock}},
    )
    host.hv.start("stratus-vm-9")

    assert host.hv.console("stratus-vm-9") == ConsoleEndpoint(
        "unix", path=sock, desktop_name="QEMU (stratus-vm-9)"
    )


def test_a_stopped_vm_has_no_console(host, make_spec):
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    host.hv.force_off(spec.name)

    with pytest.raises(DomainMissing, match="not running"):
        host.hv.console(spec.name)


def test_a_vnc_port_not_yet_assigned_is_an_error_not_port_minus_one(host, make_spec):
    spec = make_spec()  # autoport: the test driver never assigns one
    host.hv.provision(spec, seed_iso=seed())

    with pytest.raises(HypervisorError, match="no VNC port yet"):
        host.hv.console(spec.name)


# --- virt type -------------------------------------------------------------------------------


def test_qemu_and_auto_resolve_to_tcg(host):
    assert host.hv.resolve_virt_type("qemu") == "qemu"
    assert host.hv.resolve_virt_type("auto") == "qemu"


def test_kvm_is_refused_on_a_host_that_does_not_offer_it(host):
    with pytest.raises(HypervisorError, match="does not offer KVM"):
        host.hv.resolve_virt_type("kvm")


def test_an_unknown_virt_type_is_refused(host):
    with pytest.raises(HypervisorError, match="unknown virt type"):
        host.hv.resolve_virt_type("xen")


# --- errors ----------------------------------------------------------------------------------


def test_a_host_that_refuses_connections_is_a_transient_error():
    hv = LibvirtDriver("qemu+tcp://127.0.0.1:1/system", host_name="h9")

    with pytest.raises(HypervisorUnavailable, match="host h9 did not answer: .*refused"):
        hv.states()


def test_an_unusable_uri_is_a_permanent_error():
    hv = LibvirtDriver("test:///no/such/node.xml", host_name="h9")

    with pytest.raises(HypervisorError) as raised:
        hv.states()
    assert not isinstance(raised.value, HypervisorUnavailable)
    assert "cannot connect to host h9" in str(raised.value)


class FakeLibvirtError:
    def __init__(self, code: int, domain: int = libvirt.VIR_FROM_QEMU) -> None:
        self.code, self.domain = code, domain

    def get_error_code(self) -> int:
        return self.code

    def get_error_domain(self) -> int:
        return self.domain

    def get_error_message(self) -> str:
        return "details from libvirt"


@pytest.mark.parametrize(
    ("code", "domain", "expected"),
    [
        (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_FROM_QEMU, HypervisorUnavailable),
        (libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, HypervisorUnavailable),
        (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, HypervisorUnavailable),
        (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_FROM_QEMU, HypervisorUnavailable),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, HypervisorUnavailable),
        (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_REMOTE, HypervisorUnavailable),
        (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_STORAGE, HypervisorError),
        (libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_FROM_DOMAIN, HypervisorError),
        (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_FROM_QEMU, HypervisorError),
        (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU, HypervisorError),
        (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_FROM_QEMU, DomainMissing),
    ],
)
def test_libvirt_errors_map_to_transient_permanent_or_missing(code, domain, expected):
    error = libvirt_errors.classify(FakeLibvirtError(code, domain), host="h1", doing="starting x")

    assert type(error) is expected
    assert "h1" in str(error)
    if expected is HypervisorUnavailable:
        assert str(error) == "host h1 did not answer while starting x: details from libvirt"


def test_every_adapter_error_is_a_hypervisor_error():
    assert issubclass(HypervisorUnavailable, HypervisorError)
    assert issubclass(DomainMissing, HypervisorError)
    assert not issubclass(DomainMissing, HypervisorUnavailable)


def test_the_adapter_is_the_only_module_that_imports_libvirt():
    labs = os.path.join(os.path.dirname(domain_xml.__file__), os.pardir, os.pardir)
    importers = []
    for directory, _dirs, files in os.walk(os.path.normpath(labs)):
        for filename in files:
            if filename.endswith(".py"):
                path = os.path.join(directory, filename)
                with open(path, encoding="utf-8") as handle:
                    lines = handle.read().splitlines()
                if any(line.startswith(("import libvirt", "from libvirt ")) for line in lines):
                    importers.append(os.path.relpath(path, labs))
    assert importers and all(
        path.startswith(os.path.join("drivers", "libvirt") + os.sep) for path in importers
    ), importers
