from django.db import models


class Role(models.TextChoices):
    STUDENT = "student", "Student"
    TA = "ta", "TA"
    INSTRUCTOR = "instructor", "Instructor"


STAFF_ROLES = (Role.TA, Role.INSTRUCTOR)


class GroupStatus(models.TextChoices):
    PENDING = "pending", "Pending review"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"


class VirtType(models.TextChoices):
    AUTO = "auto", "Auto (probe)"
    KVM = "kvm", "KVM"
    QEMU = "qemu", "QEMU (TCG, no acceleration)"


class DriverKind(models.TextChoices):
    LIBVIRT = "libvirt", "libvirt (QEMU/KVM)"


class NetworkMode(models.TextChoices):
    USER = "user", "User-mode (SSH forwarded on the host's loopback)"
    BRIDGE = "bridge", "Bridge (production: guest on a host bridge)"


class PlacementPolicy(models.TextChoices):
    PACK = "pack", "Pack: the fullest host that still fits (hosts empty for maintenance)"
    SPREAD = "spread", "Spread: the host with the most free memory"


class HostState(models.TextChoices):
    """What a host is to placement, in precedence order (``Host.state``)."""

    DISABLED = "disabled", "Disabled"
    DRAINING = "draining", "Draining"
    UNREACHABLE = "unreachable", "Unreachable"
    UP = "up", "Up"


class DesiredState(models.TextChoices):
    RUNNING = "running", "Running"
    STOPPED = "stopped", "Stopped"
    DELETED = "deleted", "Deleted"


class ObservedState(models.TextChoices):
    NEW = "new", "Not created yet"
    RUNNING = "running", "Running"
    SHUTOFF = "shutoff", "Stopped"
    PAUSED = "paused", "Paused"
    SAVED = "saved", "Suspended to disk"
    CRASHED = "crashed", "Crashed"
    MISSING = "missing", "Missing on host"
    UNKNOWN = "unknown", "Unknown (host did not answer)"
    DELETED = "deleted", "Deleted"


class OperationKind(models.TextChoices):
    PROVISION = "provision", "Provision"
    START = "start", "Start"
    STOP = "stop", "Shut down"
    REBOOT = "reboot", "Reboot"
    FORCE_OFF = "force_off", "Force off"
    SUSPEND = "suspend", "Suspend"
    RESUME = "resume", "Resume"
    SNAPSHOT = "snapshot", "Snapshot"
    REVERT = "revert", "Revert to snapshot"
    SNAPSHOT_DELETE = "snapshot_delete", "Delete snapshot"
    RESET = "reset", "Reset to baseline"
    SSH_SYNC = "ssh_sync", "Update SSH access"
    MOVE = "move", "Move to another host"
    SAVE = "save", "Suspend to disk"
    DELETE = "delete", "Delete"
    ARCHIVE = "archive", "Archive and remove"
    VOLUME_CREATE = "volume_create", "Add volume"
    VOLUME_ATTACH = "volume_attach", "Attach volume"
    VOLUME_DETACH = "volume_detach", "Detach volume"
    VOLUME_DELETE = "volume_delete", "Delete volume"
    PORT_PUBLISH = "port_publish", "Publish port"
    PORT_UNPUBLISH = "port_unpublish", "Unpublish port"
    NETWORK_SYNC = "network_sync", "Update group network"
    FIREWALL_SYNC = "firewall_sync", "Update group firewall"

    CAPTURE = "capture", "Capture as an image"


class FirewallProtocol(models.TextChoices):
    """What a group firewall rule lets in (labs/compute/firewall.py)."""

    TCP = "tcp", "TCP"
    UDP = "udp", "UDP"
    ICMP = "icmp", "ICMP"


class FirewallSource(models.TextChoices):
    """From where a group firewall rule lets it in: the group's own VMs (its /24), or
    the hosts' side of the group network (the reserved /28: the instructor's gateway)."""

    GROUP = "group", "the group's VMs"
    GATEWAY = "gateway", "the instructor's gateway"


class VolumeState(models.TextChoices):
    """Where a block volume's file is (Volume.state): asked for, on its host, or going."""

    CREATING = "creating", "Being created"
    READY = "ready", "Ready"
    DELETING = "deleting", "Being deleted"


class PortState(models.TextChoices):
    """Where a published port is (Publication.state): asked for, forwarded, or going.
    Whether it answers is the VM's business too: nothing listens while it is not running."""

    OPENING = "opening", "Opening"
    PUBLISHED = "published", "Published"
    CLOSING = "closing", "Closing"


class OperationStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


ACTIVE_OPERATION_STATUSES = (OperationStatus.QUEUED, OperationStatus.RUNNING)


class ClockAfter(models.TextChoices):
    """What the course clock does with a course's VMs after a class (Course.clock_after)."""

    SUSPEND = "suspend", "Suspend them (memory kept)"
    STOP = "stop", "Shut them down"
    LEAVE = "leave", "Leave them running"


class IdleAction(models.TextChoices):
    """What the course clock does with a VM nobody has used for the idle time
    (Course.idle_action)."""

    SAVE = "save", "Suspend it to disk (memory kept)"
    STOP = "stop", "Shut it down"


class ClockPhase(models.TextChoices):
    """The two moments of a class window the course clock acts at (ClockAction.phase)."""

    BEFORE = "before", "Before class"
    AFTER = "after", "After class"


class Weekday(models.IntegerChoices):
    MONDAY = 0, "Monday"
    TUESDAY = 1, "Tuesday"
    WEDNESDAY = 2, "Wednesday"
    THURSDAY = 3, "Thursday"
    FRIDAY = 4, "Friday"
    SATURDAY = 5, "Saturday"
    SUNDAY = 6, "Sunday"


class ImageSource(models.TextChoices):
    """Where a course image came from (labs/compute/images.py)."""

    BUILT = "built", "Built (build_image)"
    IMPORTED = "imported", "Imported (checked upload)"
    CAPTURED = "captured", "Captured from a VM"


class ImageCopyState(models.TextChoices):
    """An image's copy on one host: placement uses only hosts whose copy is present."""

    COPYING = "copying", "Copying"
    PRESENT = "present", "Present (checksum verified)"
    FAILED = "failed", "Failed"
