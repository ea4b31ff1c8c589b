"""The driver methods the idle rule reads (labs/compute/idle.py), against libvirt's own
test driver: CPU times of every running Stratus domain in one call, and the guest agent's
logged-in users, None when there is no agent to answer (the test driver has none)."""

import xml.etree.ElementTree as ET

import pytest

from labs.drivers.libvirt import LibvirtDriver, agent


def define(conn, name: str, *, start: bool) -> str:
    domain = ET.Element("domain", type="test")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "128"
    ET.SubElement(domain, "vcpu").text = "2"
    ET.SubElement(ET.SubElement(domain, "os"), "type", arch="x86_64", machine="pc").text = "hvm"
    dom = conn.defineXML(ET.tostring(domain, encoding="unicode"))
    if start:
        dom.create()
    return dom.UUIDString()


@pytest.fixture
def hv(tmp_path):
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    driver = LibvirtDriver(f"test://{node}", host_name="h1")
    yield driver
    driver.close()


def test_cpu_times_cover_the_running_stratus_domains_only(hv):
    running = define(hv._conn, "stratus-vm-1", start=True)
    define(hv._conn, "stratus-vm-2", start=False)
    define(hv._conn, "someone-elses", start=True)
    times = hv.cpu_times()
    assert list(times) == [running]
    assert isinstance(times[running], int) and times[running] >= 0


def test_guest_users_is_none_when_no_agent_answers_or_the_vm_is_off_or_missing(hv):
    define(hv._conn, "stratus-vm-1", start=True)
    define(hv._conn, "stratus-vm-2", start=False)
    assert hv.guest_users("stratus-vm-1", timeout=1) is None  # the test driver has no agent
    assert hv.guest_users("stratus-vm-2", timeout=1) is None
    assert hv.guest_users("stratus-vm-404", timeout=1) is None


def test_guest_users_names_each_logged_in_user_once(monkeypatch):
    # qemu-ga lists one entry per session (two SSH logins of alice: two entries).
    reply = [
        {"user": "alice", "login-time": 1765000000.5},
        {"user": "bob", "login-time": 1765000001.0},
        {"user": "alice", "login-time": 1765000002.0},
    ]
    monkeypatch.setattr(agent, "_command", lambda dom, execute, timeout: reply)
    assert agent.users(object(), timeout=1) == ["alice", "bob"]
