"""One executor per operation kind: drive the host's driver, then record what it holds.

The runner (``labs.compute.runner``) claims an Operation and calls the executor its kind's
catalogue entry names (``labs.compute.kinds``). An executor raises the driver's errors
as they come (the runner turns them into a retry or a failure) and records the VM's new
state through ``labs.compute.records``.
"""

import uuid
from contextlib import suppress

from django.conf import settings
from django.utils import timezone

from labs.choices import DesiredState, NetworkMode, ObservedState, PortState, VolumeState
from labs.compute import firewall, networks, shares, ssh_access
from labs.compute.image_copies import image_for_reset
from labs.compute.records import (
    NO_CONSOLE,
    driver_of,
    observed_of,
    operation_progress,
    vm_console_record,
    vm_consoles_close,
    vm_observe,
)
from labs.drivers import cloudinit
from labs.drivers.base import HypervisorError, HypervisorUnavailable, PortSpec, VmSpec, VolumeSpec
from labs.drivers.registry import driver_for
from labs.errors import Refused
from labs.live import events
from labs.models import Operation, Publication, Snapshot, Vm, Volume


def vm_spec(vm: Vm) -> VmSpec:
    """Everything the driver needs to build the VM, from its rows."""
    host = vm.host
    user_mode = host.network_mode == NetworkMode.USER
    return VmSpec(
        name=vm.domain_name,
        uuid=str(vm.uuid),
        title=f"{vm.group.name} / {vm.name}",
        description=f"Stratus VM {vm.name} of group {vm.group.name} ({vm.group.course.slug})",
        vcpus=vm.vcpus,
        memory_mib=vm.memory_mib,
        disk_gib=vm.disk_gib,
        base_image=vm.image.path,
        storage_dir=host.storage_dir,
        virt_type=driver_of(vm).resolve_virt_type(host.virt_type),
        network=host.network_mode,
        ssh_port=vm.ssh_port if user_mode else None,
        bridge=host.bridge,
        metadata={"vm": str(vm.pk), "group": str(vm.group_id), "course": vm.group.course.slug},
        volumes=tuple(volume_spec(v) for v in vm.volumes.order_by("pk")),
        ports=port_specs(vm) if user_mode else (),
        shares=shares.share_specs(vm),
        group_nic=networks.nic_spec(vm),
    )


def port_specs(vm: Vm, *, without: int | None = None) -> tuple[PortSpec, ...]:
    """The ports the VM's domain forwards beside SSH's: its publications but those being
    unpublished (and ``without``, the one going now)."""
    rows = Publication.objects.filter(vm=vm).exclude(state=PortState.CLOSING)
    if without is not None:
        rows = rows.exclude(pk=without)
    return tuple(
        PortSpec(host_port=host_port, guest_port=guest_port)
        for host_port, guest_port in rows.order_by("host_port").values_list(
            "host_port", "guest_port"
        )
    )


def volume_spec(volume: Volume) -> VolumeSpec:
    return VolumeSpec(file_name=volume.file_name, serial=volume.serial, size_gib=volume.size_gib)


def vm_seed(vm: Vm, access: ssh_access.Access) -> bytes:
    """The cloud-init seed: the group's key for the login user and every member (and,
    with a group NIC, the network-config that brings both NICs up)."""
    nic = networks.nic_spec(vm)
    return cloudinit.seed_build(
        network_config=None
        if nic is None
        else cloudinit.network_config_two_nics(group_mac=nic.mac),
        instance_id=vm.instance_id,
        hostname=cloudinit.hostname_for(f"{vm.group.name}-{vm.name}"),
        login_user=access.accounts[0],
        extra_users=access.accounts[1:],
        ssh_public_key=access.key,
        mounts=shares.share_mounts(vm),
    )


def _desire(vm: Vm, state: str) -> None:
    Vm.objects.filter(pk=vm.pk).update(desired_state=state)


def _running(vm: Vm, driver=None) -> None:
    """The VM runs now: record its (new) console endpoint and its state; SSH access it
    has not got yet follows (ssh_access)."""
    vm_console_record(vm, driver)
    vm_observe(vm, ObservedState.RUNNING, "")
    ssh_access.vm_started(vm)


def _shares_from_course(vm: Vm) -> None:
    """A VM made or reset gets the shares its course has now (labs/compute/shares.py)."""
    vm.shares = vm.group.course.shares
    Vm.objects.filter(pk=vm.pk).update(shares=vm.shares)


def _group_network_up(op: Operation, driver) -> bool:
    """The VM's group network on its host made to hold the group as it is now (before
    its domain starts: the NIC needs the network). Whether the VM has a group NIC."""
    vm = op.vm
    if not networks.vm_network_join(vm=vm):
        return False
    operation_progress(op)("preparing the group network")
    _timings(op, group_network_s=_network_ensure(driver, vm))
    return True


def _network_ensure(driver, vm: Vm) -> float:
    """The group's network (and firewall) on the VM's host as the group is now; the
    firewall's change it holds recorded."""
    wanted = firewall.wanted_at(group=vm.group)
    seconds = driver.network_ensure(networks.network_spec(group=vm.group, host=vm.host))
    firewall.applied_record(group=vm.group, host_id=vm.host_id, wanted=wanted)
    return seconds


def _group_network_tell_peers(vm: Vm) -> None:
    """The group's other hosts learn about the VM (its DHCP/DNS entry, this host as a
    VXLAN peer): a ``network_sync`` on each."""
    networks.peers_sync(vm=vm)


def provision(op: Operation) -> None:
    vm = op.vm
    _shares_from_course(vm)
    driver = driver_of(vm)
    joined = _group_network_up(op, driver)
    since, access = timezone.now(), ssh_access.access_wanted(vm)
    driver.provision(vm_spec(vm), seed_iso=vm_seed(vm, access), progress=operation_progress(op))
    ssh_access.access_reset(vm, access, since=since)
    _running(vm, driver)
    if joined:
        # Again: VMs of the group added while this one was being made are listed now
        # (their own sync skipped this VM's host while it was busy).
        driver.network_ensure(networks.network_spec(group=vm.group, host=vm.host))
        _group_network_tell_peers(vm)


def network_sync(op: Operation) -> None:
    """The group's network on the VM's host brought up to date (entries, VXLAN peers)."""
    vm = op.vm
    driver = driver_of(vm)
    if not networks.enabled_on(vm.host):
        return
    _timings(op, group_network_s=_network_ensure(driver, vm))


def firewall_sync(op: Operation) -> None:
    """The group's firewall on the VM's host redefined to its rules now (labs/compute/
    firewall.py); read again after applying, so that a change made meanwhile is not lost."""
    vm = op.vm
    if not networks.enabled_on(vm.host):
        return
    driver = driver_of(vm)
    applied, seconds = None, 0.0
    for _round in range(3):
        wanted = firewall.wanted_at(group=vm.group)  # before the rules: never ahead of them
        spec = networks.network_spec(group=vm.group, host=vm.host)
        if spec.firewall == applied:
            break
        seconds += driver.firewall_apply(spec)
        applied = spec.firewall
        firewall.applied_record(group=vm.group, host_id=vm.host_id, wanted=wanted)
    _timings(op, firewall_s=round(seconds, 3))
    operation_progress(op)(f"{len(applied or ())} rules applied on {vm.host.name}")


def start(op: Operation) -> None:
    driver = driver_of(op.vm)
    if op.vm.group_ip:
        _group_network_up(op, driver)  # a host rebooted since: its network comes back
    driver.start(op.vm.domain_name)
    _desire(op.vm, DesiredState.RUNNING)
    _running(op.vm, driver)


def stop(op: Operation) -> None:
    report = operation_progress(op)
    vm_consoles_close(op.vm, "the VM is shutting down")
    clean = driver_of(op.vm).shutdown(
        op.vm.domain_name, timeout=settings.VM_SHUTDOWN_TIMEOUT, progress=report
    )
    _desire(op.vm, DesiredState.STOPPED)
    vm_observe(op.vm, ObservedState.SHUTOFF, "")
    if not clean:
        report("the guest did not shut down in time; it was forced off")


def reboot(op: Operation) -> None:
    """A running guest reboots in the same QEMU; a stopped one is started, with a new
    console socket: read it either way, like every other path that starts a VM."""
    driver = driver_of(op.vm)
    driver.reboot(op.vm.domain_name)
    _desire(op.vm, DesiredState.RUNNING)
    _running(op.vm, driver)


def force_off(op: Operation) -> None:
    vm_consoles_close(op.vm, "the VM was forced off")
    driver_of(op.vm).force_off(op.vm.domain_name)
    _desire(op.vm, DesiredState.STOPPED)
    vm_observe(op.vm, ObservedState.SHUTOFF, "")


def suspend(op: Operation) -> None:
    """Pause in RAM: consoles stay open (the screen just stops); SSH sessions stall."""
    driver_of(op.vm).suspend(op.vm.domain_name)
    vm_observe(op.vm, ObservedState.PAUSED, "")


def save(op: Operation) -> None:
    """Suspend to disk (managed save): QEMU ends, so consoles close and SSH sessions drop;
    the guest's processes and memory come back with the next start or resume."""
    report = operation_progress(op)
    vm_consoles_close(op.vm, "the VM is being suspended to disk")
    report("saving the VM's memory to disk")
    driver_of(op.vm).managed_save(op.vm.domain_name)
    Vm.objects.filter(pk=op.vm.pk).update(**NO_CONSOLE)
    vm_observe(op.vm, ObservedState.SAVED, "")


def resume(op: Operation) -> None:
    """A paused VM runs on; one suspended to disk is restored (a start)."""
    driver = driver_of(op.vm)
    if op.vm.observed_state == ObservedState.SAVED:
        driver.start(op.vm.domain_name)
    else:
        driver.resume(op.vm.domain_name)
    _desire(op.vm, DesiredState.RUNNING)
    _running(op.vm, driver)


def snapshot(op: Operation) -> None:
    """Re-run after a crash, the host's snapshot of that name is kept and only recorded."""
    name, with_memory = op.params["name"], bool(op.params.get("with_memory"))
    report = operation_progress(op)
    report("taking the snapshot")
    driver_of(op.vm).snapshot_create(op.vm.domain_name, name, with_memory=with_memory)
    report("recording the snapshot")
    # The deadline's snapshot (labs/compute/term.py) is final: only staff may delete it.
    final = bool(op.params.get("final"))
    # libvirt snapshots every qcow2 disk of the domain: the attached volumes are in it.
    volumes = [
        {"id": v.pk, "name": v.name, "serial": v.serial} for v in op.vm.volumes.order_by("pk")
    ]
    snap, created = Snapshot.objects.get_or_create(
        vm=op.vm,
        name=name,
        defaults={
            "with_memory": with_memory,
            "created_by": op.requested_by,
            "final": final,
            "volumes": volumes,
        },
    )
    if final and not snap.final:
        Snapshot.objects.filter(pk=snap.pk).update(final=True)


def revert(op: Operation) -> None:
    vm = op.vm
    driver = driver_of(vm)
    report = operation_progress(op)
    refused = revert_refusal(vm, op.params["name"])
    if refused is not None:
        raise refused
    vm_consoles_close(vm, "the VM is being reverted to a snapshot")
    report("reverting to the snapshot")
    driver.snapshot_revert(vm.domain_name, op.params["name"])
    report("reading the VM's state")
    state = observed_of(driver.state(vm.domain_name))
    if state == ObservedState.RUNNING:
        vm_console_record(vm, driver)
    _desire(vm, DesiredState.RUNNING if state == ObservedState.RUNNING else DesiredState.STOPPED)
    vm_observe(vm, state, "")
    # The disk holds the accounts and keys of the snapshot's time: bring them up to date.
    ssh_access.vm_access_unknown(vm)


def revert_refusal(vm: Vm, name: str) -> Refused | None:
    """A revert puts back the disks the snapshot holds, volumes included: refused unless
    the VM has exactly the volumes it had then (a volume detached since, or attached to
    another VM, would come back attached here)."""
    snap = Snapshot.objects.filter(vm=vm, name=name).first()
    if snap is None:
        return None
    then = {v["serial"]: v["name"] for v in snap.volumes}
    now = dict(vm.volumes.values_list("serial", "name"))
    if then.keys() == now.keys():
        return None
    missing = [then[s] for s in then if s not in now]
    extra = [now[s] for s in now if s not in then]
    parts = []
    if missing:
        parts.append(f"attach {', '.join(sorted(missing))} again")
    if extra:
        parts.append(f"detach {', '.join(sorted(extra))}")
    return Refused(
        f"Snapshot {name} of {vm.name} was taken with other volumes: "
        + " and ".join(parts)
        + " first."
    )


def snapshot_delete(op: Operation) -> None:
    driver_of(op.vm).snapshot_delete(op.vm.domain_name, op.params["name"])
    Snapshot.objects.filter(vm=op.vm, name=op.params["name"]).delete()


def reset(op: Operation) -> None:
    vm = op.vm
    vm.instance_id = uuid.uuid4().hex  # cloud-init runs again: keys, users, hostname
    Vm.objects.filter(pk=vm.pk).update(instance_id=vm.instance_id)
    # The course template's current image (it may have switched since the VM was made).
    image_for_reset(vm)
    _shares_from_course(vm)
    vm_consoles_close(vm, "the VM is being reset to its baseline")
    driver = driver_of(vm)
    _group_network_up(op, driver)
    since, access = timezone.now(), ssh_access.access_wanted(vm)
    driver.reset(vm_spec(vm), seed_iso=vm_seed(vm, access), progress=operation_progress(op))
    ssh_access.access_reset(vm, access, since=since)
    Snapshot.objects.filter(vm=vm).delete()
    _desire(vm, DesiredState.RUNNING)
    _running(vm, driver)


def ssh_sync(op: Operation) -> None:
    """The guest's accounts and keys become the group's members and key, through its
    agent: members who left are disabled, new members get an account, a replaced key is
    taken out. Keys a student added to an account themselves stay."""
    vm = Vm.objects.select_related("group", "image", "host").get(pk=op.vm_id)
    since, access = timezone.now(), ssh_access.access_wanted(vm)
    driver_of(vm).guest_ssh_set(
        vm.domain_name,
        accounts=access.accounts,
        key=access.key,
        retired_keys=[k for k in vm.ssh_keys if k != access.key],
        revoked=[a for a in vm.ssh_accounts if a not in access.accounts],
        timeout=settings.GUEST_AGENT_TIMEOUT,
    )
    ssh_access.access_given(vm, access, since=since)


def delete(op: Operation) -> None:
    vm = op.vm
    vm_consoles_close(vm, "the VM is being deleted")
    driver = driver_of(vm)
    driver.delete(vm_spec(vm))
    Snapshot.objects.filter(vm=vm).delete()
    volumes_release(vm)
    Publication.objects.filter(vm=vm).delete()  # its host ports are free again
    if vm.group_ip:
        _group_network_leave(op, vm, driver)
    Vm.objects.filter(pk=vm.pk).update(desired_state=DesiredState.DELETED, ssh_port=None)
    vm_observe(vm, ObservedState.DELETED, "")


def _group_network_leave(op: Operation, vm: Vm, driver) -> None:
    """The deleted VM's entry out of its host's group network (the network itself when
    it was the group's last VM there), its address freed, the other hosts told."""
    entry = networks.network_host(vm)
    if networks.enabled_on(vm.host) and entry is not None:
        spec = networks.network_spec(group=vm.group, host=vm.host, leaving=vm)
        others_here = any(
            v.host_id == vm.host_id for v in networks.group_vms(vm.group) if v.pk != vm.pk
        )
        if others_here:
            _timings(op, group_network_s=driver.network_host_remove(spec, entry))
        else:
            _timings(op, group_network_s=driver.network_remove(spec))
    networks.vm_network_leave(vm=vm)
    _group_network_tell_peers(vm)


def volumes_release(vm: Vm) -> None:
    """The VM is gone from its host: its volumes stay there, detached, for the group to
    attach to another VM (or delete)."""
    Volume.objects.filter(vm=vm).update(vm=None)


# --- block volumes (labs/compute/volumes.py asks for these) ----------------------------------


def _volume_of(op: Operation) -> Volume:
    return Volume.objects.select_related("host", "group").get(pk=op.params["volume"])


def _timings(op: Operation, **seconds: float) -> None:
    timings = {**op.params.get("timings", {}), **{k: round(v, 3) for k, v in seconds.items()}}
    op.params = {**op.params, "timings": timings}
    Operation.objects.filter(pk=op.pk).update(params=op.params)


def volume_create(op: Operation) -> None:
    """The volume's qcow2 on its host, then attached to the VM it was made for."""
    volume = _volume_of(op)
    report = operation_progress(op)
    report(f"creating volume {volume.name}")
    driver = driver_for(volume.host)
    created = driver.volume_create(storage_dir=volume.host.storage_dir, volume=volume_spec(volume))
    Volume.objects.filter(pk=volume.pk).update(state=VolumeState.READY)
    _timings(op, create_s=created)
    report(f"attaching {volume.name} to {op.vm.name}")
    _attach(op, volume, driver)


def volume_attach(op: Operation) -> None:
    volume = _volume_of(op)
    operation_progress(op)(f"attaching {volume.name} to {op.vm.name}")
    _attach(op, volume, driver_for(volume.host))


def _attach(op: Operation, volume: Volume, driver) -> None:
    if volume.host_id != op.vm.host_id:  # moved meanwhile: never attach across hosts
        raise Refused(f"Volume {volume.name} is on another host than {op.vm.name}.")
    attached = driver.volume_attach(
        op.vm.domain_name, storage_dir=volume.host.storage_dir, volume=volume_spec(volume)
    )
    Volume.objects.filter(pk=volume.pk).update(vm=op.vm)
    _timings(op, attach_s=attached)
    events.vm_changed(vm=op.vm)


def volume_detach(op: Operation) -> None:
    volume = _volume_of(op)
    operation_progress(op)(f"detaching {volume.name} from {op.vm.name}")
    detached = driver_for(volume.host).volume_detach(
        op.vm.domain_name, volume=volume_spec(volume), timeout=settings.VOLUME_DETACH_TIMEOUT
    )
    Volume.objects.filter(pk=volume.pk, vm=op.vm).update(vm=None)
    _timings(op, detach_s=detached)
    events.vm_changed(vm=op.vm)


def volume_delete(op: Operation) -> None:
    """The detached volume's file, then its row (the Operation keeps its name)."""
    volume = Volume.objects.select_related("host").filter(pk=op.params["volume"]).first()
    if volume is None:
        return  # a retry after the row went: done
    if volume.vm_id is not None:
        raise Refused(f"Volume {volume.name} is attached to a VM: detach it first.")
    # Attachable no more from now on; a failed deletion shows it, and may be asked again.
    Volume.objects.filter(pk=volume.pk).update(state=VolumeState.DELETING)
    operation_progress(op)(f"deleting volume {volume.name}")
    deleted = driver_for(volume.host).volume_delete(
        storage_dir=volume.host.storage_dir, volume=volume_spec(volume)
    )
    _timings(op, delete_s=deleted)
    volume.delete()
    events.vm_changed(vm=op.vm)


# --- published ports (labs/compute/ports.py asks for these) ----------------------------------


def _ports_apply(vm: Vm, *, without: int | None = None) -> float:
    return driver_of(vm).ports_apply(
        vm.domain_name, ssh_port=vm.ssh_port, ports=port_specs(vm, without=without)
    )


def port_publish(op: Operation) -> None:
    """The VM's domain forwards the new port too: in its definition (every later start)
    and, when it runs, in its QEMU at once. A host that refuses the port (something else
    listens there) leaves the VM as it was and the publication gone, its port free."""
    pub = Publication.objects.filter(pk=op.params["publication"]).first()
    if pub is None:
        return  # unpublished meanwhile
    operation_progress(op)(f"publishing guest port {pub.guest_port} on port {pub.host_port}")
    try:
        seconds = _ports_apply(op.vm)
    except HypervisorUnavailable:
        raise  # tried again
    except HypervisorError:
        pub.delete()
        with suppress(HypervisorError):
            _ports_apply(op.vm)  # whatever half was done, undone
        events.vm_changed(vm=op.vm)
        raise
    Publication.objects.filter(pk=pub.pk).update(state=PortState.PUBLISHED)
    _timings(op, publish_s=seconds)
    events.vm_changed(vm=op.vm)


def port_unpublish(op: Operation) -> None:
    """The forward goes from the definition and the running QEMU; the row, and its host
    port, with it."""
    pub = Publication.objects.filter(pk=op.params["publication"]).first()
    if pub is None:
        return  # a retry after the row went: done
    operation_progress(op)(f"closing guest port {pub.guest_port} (port {pub.host_port})")
    seconds = _ports_apply(op.vm, without=pub.pk)
    pub.delete()
    _timings(op, unpublish_s=seconds)
    events.vm_changed(vm=op.vm)
