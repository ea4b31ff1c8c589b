"""The end of term's archives: the ARCHIVE executor (shut down, export the disk as a
standalone compressed qcow2 with a manifest, delete the VM) and ``manage.py
restore_archive``, which brings one back (docs/course-clock.md, "The end of term";
docs/operations.md, "Archives"). When archives are asked for is labs/compute/term.py's.
"""

import json
import logging
import os
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from labs.choices import DesiredState, ObservedState
from labs.compute import executors, networks, placement, ssh_access
from labs.compute.records import driver_of, operation_progress, vm_consoles_close, vm_observe
from labs.drivers.qcow2 import ImageRefused, file_sha256, standalone_check
from labs.errors import Refused
from labs.models import Host, Operation, Publication, Snapshot, Vm, VmArchive

log = logging.getLogger(__name__)
S = ObservedState

# --- the archive (the ARCHIVE executor) ------------------------------------------------------


def archive_paths(vm: Vm) -> tuple[Path, Path]:
    """Where ``vm``'s archive and manifest go: <dir>/<course>/<group>-<vm>.qcow2 (the
    group's id added when another group's archive has the name)."""
    course_dir = Path(settings.STRATUS_ARCHIVE_DIR) / vm.group.course.slug
    stem = f"{slugify(vm.group.name) or 'group'}-{vm.name}"
    disk = course_dir / f"{stem}.qcow2"
    if disk.exists() or VmArchive.objects.filter(path=str(disk)).exists():
        disk = course_dir / f"{stem}-{vm.group_id}-{vm.pk}.qcow2"
    return disk, disk.with_suffix(".json")


def manifest_of(vm: Vm, *, sha256: str, size: int, created: datetime) -> dict:
    members = vm.group.memberships.select_related("user").order_by("user__username")
    return {
        "format": 1,
        "course": {"slug": vm.group.course.slug, "title": vm.group.course.title},
        "term": vm.group.course.term,
        "group": {"id": vm.group_id, "name": vm.group.name},
        "members": [
            {"username": m.user.username, "name": m.user.get_full_name()} for m in members
        ],
        "vm": {
            "id": vm.pk,
            "name": vm.name,
            "uuid": str(vm.uuid),
            "instance_id": vm.instance_id,
            "vcpus": vm.vcpus,
            "memory_mib": vm.memory_mib,
            "disk_gib": vm.disk_gib,
            "host": vm.host.name if vm.host else "",
        },
        "image": {"name": vm.image.name, "os": vm.image.os, "login_user": vm.image.login_user},
        # The archive is the disk as it was at the end of term; the snapshots (internal to
        # the old disk) are listed for the record, not kept.
        "snapshots": [
            {
                "name": s.name,
                "created_at": s.created_at.isoformat(),
                "with_memory": s.with_memory,
                "final": s.final,
            }
            for s in vm.snapshots.order_by("created_at")
        ],
        "sha256": sha256,
        "size_bytes": size,
        "created_at": created.isoformat(),
    }


def _export(vm: Vm, driver, spec, report) -> VmArchive:
    disk, manifest_path = archive_paths(vm)
    partial = disk.with_name(disk.name + ".partial")
    try:
        report("exporting the disk (flattened, compressed)")
        driver.disk_export(spec, str(partial))
        report("checking the archive")
        sha256, size, created = file_sha256(str(partial)), partial.stat().st_size, timezone.now()
        manifest = manifest_of(vm, sha256=sha256, size=size, created=created)
        manifest["file"] = disk.name
        tmp = manifest_path.with_name(manifest_path.name + ".partial")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, manifest_path)
        os.replace(partial, disk)
        return VmArchive.objects.create(
            vm=vm, path=str(disk), size_bytes=size, sha256=sha256, manifest=manifest
        )
    except BaseException:
        for leftover in (partial, manifest_path.with_name(manifest_path.name + ".partial")):
            with suppress(FileNotFoundError):
                leftover.unlink()
        if not VmArchive.objects.filter(path=str(disk)).exists():
            for leftover in (disk, manifest_path):
                with suppress(FileNotFoundError):
                    leftover.unlink()
        raise


def vm_archive(op: Operation) -> None:
    """Shut the VM down, archive its disk, delete it. Re-run after a crash, an archive
    this operation made already is kept and only the deletion is done again."""
    vm = Vm.objects.select_related("group__course", "host", "image").get(pk=op.vm_id)
    driver, spec, report = driver_of(vm), executors.vm_spec(vm), operation_progress(op)
    made = VmArchive.objects.filter(vm=vm, created_at__gte=op.created_at).first()
    if made is None:
        was = vm.observed_state
        vm_consoles_close(vm, "the VM is being archived at the end of term")
        if was == S.SAVED:  # its memory comes back so that it can shut down cleanly
            report("restoring the VM from disk to shut it down")
            driver.start(vm.domain_name)
        report("shutting down")
        clean = driver.shutdown(vm.domain_name, timeout=settings.VM_SHUTDOWN_TIMEOUT)
        if not clean:
            report("the guest did not shut down in time; it was forced off")
        Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.STOPPED)
        vm_observe(vm, S.SHUTOFF, "")
        try:
            made = _export(vm, driver, spec, report)
        except Exception:
            if was in (S.RUNNING, S.PAUSED, S.SAVED):  # as it was: running again
                with suppress(Exception):
                    driver.start(vm.domain_name)
                    Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.RUNNING)
                    executors._running(vm, driver)
            raise
        report(f"archived to {made.path} ({made.size_bytes / 2**20:.0f} MiB)")
    report("removing the VM")
    driver.delete(spec)
    Snapshot.objects.filter(vm=vm).delete()
    executors.volumes_release(vm)  # its block volumes stay on the host, detached
    if vm.group_ip:  # out of the group's network; a restore gives it an address again
        executors._group_network_leave(op, vm, driver)
    Publication.objects.filter(vm=vm).delete()  # a restored VM publishes nothing at first
    Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.DELETED, ssh_port=None)
    vm_observe(vm, S.DELETED, "")


# --- restoring an archive (manage.py restore_archive) ---------------------------------------


@dataclass(frozen=True)
class Restored:
    vm: Vm
    archive: VmArchive
    seconds: float


def archive_find(ref: str) -> VmArchive:
    """An archive by its id or by its file's path; Refused when there is none."""
    if ref.isdigit():
        found = VmArchive.objects.filter(pk=int(ref)).select_related("vm").first()
    else:
        real = os.path.realpath(ref)
        found = next(
            (
                a
                for a in VmArchive.objects.select_related("vm")
                if os.path.realpath(a.path) == real
            ),
            None,
        )
    if found is None:
        raise Refused(f"No archive {ref} is recorded (give an archive id or its file's path).")
    return found


def archive_check(archive: VmArchive) -> dict:
    """The archive's file is there, unchanged and standalone; its qemu-img info."""
    if not os.path.isfile(archive.path):
        raise Refused(f"The archive file {archive.path} is missing.")
    actual = file_sha256(archive.path)
    if actual != archive.sha256:
        raise Refused(
            f"The archive file {archive.path} does not match its checksum (recorded "
            f"{archive.sha256[:16]}…, the file has {actual[:16]}…): it is damaged or was "
            "replaced; not restored."
        )
    try:
        return standalone_check(archive.path)
    except ImageRefused as error:
        raise Refused(f"Not restored: {error}.") from error


def archive_restore(*, archive: VmArchive, host: Host | None = None, name: str = "") -> Restored:
    """Bring an archived VM back: the same group, its name (or ``name``), the archived
    disk as its disk (copied into the host's pool), the same instance id so the guest
    boots as it was. Refused with a clear message when it cannot be."""
    started = time.monotonic()
    archive_check(archive)
    old = Vm.objects.select_related("group__course", "host", "image").get(pk=archive.vm_id)
    name = name or old.name
    host = host or old.host
    if host is None:
        raise Refused("The archived VM had no host: name one with --host.")
    with transaction.atomic():
        clash = Vm.objects.filter(group=old.group, name=name)
        if name == old.name:
            clash = clash.exclude(pk=old.pk)
        if clash.exists() or (name == old.name and old.desired_state != DesiredState.DELETED):
            raise Refused(
                f"The group {old.group.name} already has a VM named {name}: choose another "
                "name with --name."
            )
        taken = placement._ports_taken([host])[host.pk]
        port = placement._free_ssh_port(host, taken)
        if port is None:
            raise Refused(f"Host {host.name} has no free SSH port.")
        if name == old.name:
            vm = old
        else:  # a new VM of the group around the same disk
            vm = Vm(
                group=old.group,
                name=name,
                image=old.image,
                vcpus=old.vcpus,
                memory_mib=old.memory_mib,
                disk_gib=old.disk_gib,
                instance_id=old.instance_id,
            )
        vm.host, vm.ssh_port = host, port
        vm.desired_state, vm.observed_state = DesiredState.RUNNING, S.NEW
        vm.status_message = f"Restored from the archive of {archive.created_at:%Y-%m-%d}."
        vm.save()
    vm = Vm.objects.select_related("group__course", "host", "image").get(pk=vm.pk)
    driver = driver_of(vm)
    wanted = ssh_access.access_wanted(vm)
    try:
        if networks.vm_network_join(vm=vm):  # its NIC's network is there before the domain
            driver.network_ensure(networks.network_spec(group=vm.group, host=host))
        driver.restore(
            executors.vm_spec(vm), disk=archive.path, seed_iso=executors.vm_seed(vm, wanted)
        )
    except Exception:
        with suppress(Exception):
            driver.delete(executors.vm_spec(vm))
        Vm.objects.filter(pk=vm.pk).update(
            desired_state=DesiredState.DELETED, observed_state=S.DELETED, ssh_port=None
        )
        if vm.group_ip:  # its address is free again, its entry out of the network
            with suppress(Exception):
                networks.vm_network_leave(vm=vm)
                _network_without(vm, driver, host)
        raise
    if vm.group_ip:
        networks.peers_sync(vm=vm)  # the group's other hosts list it (and this host)
    # The disk holds the accounts and keys of its last day: bring them up to date.
    executors._running(vm, driver)
    ssh_access.vm_access_unknown(vm)
    VmArchive.objects.filter(pk=archive.pk).update(restored_at=timezone.now())
    vm.refresh_from_db()
    return Restored(vm=vm, archive=archive, seconds=time.monotonic() - started)


def _network_without(vm: Vm, driver, host: Host) -> None:
    """The group's network on ``host`` as if ``vm`` had never been restored there."""
    spec = networks.network_spec(group=vm.group, host=host)
    if any(v.host_id == host.pk for v in networks.group_vms(vm.group)):
        driver.network_ensure(spec)
    else:
        driver.network_remove(spec)
