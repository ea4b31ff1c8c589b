"""The libvirt driver's course-image methods against libvirt's test driver: what it
refuses before touching anything (the copying and sealing run on real files in
test_qcow2_import.py and test_seal.py, and on a real guest in tests/integration)."""

import pytest

from labs.drivers.base import DomainMissing, HypervisorError
from tests.drivers.test_libvirt import host, make_spec, seed  # noqa: F401 (fixtures)


def test_capturing_a_vm_the_host_does_not_have_is_domain_missing(host, make_spec, tmp_path):  # noqa: F811 (the fixtures imported above)
    with pytest.raises(DomainMissing):
        host.hv.image_capture(make_spec(), str(tmp_path / "out.qcow2"), compress=False)
    assert not (tmp_path / "out.qcow2").exists()


def test_a_capture_is_made_where_the_disk_is(host, make_spec, tmp_path):  # noqa: F811 (the fixtures imported above)
    spec = make_spec()
    host.hv.provision(spec, seed_iso=seed())
    # The test driver's volumes are metadata only: like a worker on another machine.
    with pytest.raises(HypervisorError, match="is not on this machine"):
        host.hv.image_capture(spec, str(tmp_path / "out.qcow2"), compress=False)
    assert not (tmp_path / "out.qcow2").exists()
    assert host.hv.state(spec.name) == "running"  # never frozen, left as it was


def test_the_digest_of_a_file_the_host_lacks_is_none(host, tmp_path):  # noqa: F811 (the fixtures imported above)
    assert host.hv.image_digest(str(tmp_path / "nowhere" / "x.qcow2")) is None
    assert host.hv.image_digest(f"{host.images}/missing.qcow2") is None


def test_a_copy_never_replaces_a_file_on_the_host(host, tmp_path):  # noqa: F811 (the fixtures imported above)
    source = tmp_path / "new.qcow2"
    source.write_bytes(b"new bytes")
    with pytest.raises(HypervisorError, match="has a file at .* already"):
        host.hv.image_put(str(source), host.base)
