"""A group's firewall: the inbound rules of its VMs' group NICs (labs/compute/firewall.py,
docs/networking.md "The firewall").

One row is one opening: a protocol (tcp, udp with a port range; icmp without), and where
it may come from (the group's VMs, or the instructor's gateway: the hosts' side of the
group network). Everything else that reaches a VM's ``grp0`` unasked is dropped; replies
to what the VM opened itself always pass. A rule an instructor ``locked`` stays as it is
for the group's members (they see it, they cannot change or remove it).
"""

from django.conf import settings
from django.db import models

from labs.choices import FirewallProtocol, FirewallSource
from labs.models.courses import Group

NOTE_MAX = 80


class FirewallRule(models.Model):
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="firewall_rules")
    protocol = models.CharField(max_length=4, choices=FirewallProtocol.choices)
    # Both set for tcp and udp (one port: from == to), both empty for icmp.
    port_from = models.PositiveIntegerField(null=True, blank=True)
    port_to = models.PositiveIntegerField(null=True, blank=True)
    source = models.CharField(max_length=8, choices=FirewallSource.choices)
    note = models.CharField(max_length=NOTE_MAX, blank=True)
    locked = models.BooleanField(
        default=False, help_text="Set by the course's staff: members cannot change it."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["group", "protocol", "port_from", "source", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["group", "protocol", "port_from", "port_to", "source"],
                name="firewall_rule_unique",
                violation_error_message="The group has this rule already.",
            ),
            models.UniqueConstraint(
                fields=["group", "source"],
                condition=models.Q(protocol=FirewallProtocol.ICMP),
                name="firewall_icmp_rule_unique",
                violation_error_message="The group has this rule already.",
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(protocol=FirewallProtocol.ICMP)
                    & models.Q(port_from__isnull=True)
                    & models.Q(port_to__isnull=True)
                )
                | (
                    models.Q(protocol__in=[FirewallProtocol.TCP, FirewallProtocol.UDP])
                    # (NULL passes a CHECK: the ports are required outright.)
                    & models.Q(port_from__isnull=False)
                    & models.Q(port_to__isnull=False)
                    & models.Q(port_from__gte=1)
                    & models.Q(port_to__lte=65535)
                    & models.Q(port_from__lte=models.F("port_to"))
                ),
                name="firewall_rule_ports",
                violation_error_message=(
                    "TCP and UDP rules need ports from 1 to 65535 (from <= to); ICMP none."
                ),
            ),
            models.CheckConstraint(
                condition=models.Q(source__in=[s.value for s in FirewallSource]),
                name="firewall_rule_source",
                violation_error_message="A rule's source is the group or the gateway.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.group}: {self.label}"

    @property
    def ports(self) -> str:
        """ "22", "8000-8099" or "" (icmp)."""
        if self.port_from is None:
            return ""
        if self.port_from == self.port_to:
            return str(self.port_from)
        return f"{self.port_from}-{self.port_to}"

    @property
    def label(self) -> str:
        """ "tcp 22 from the instructor's gateway"."""
        what = f"{self.protocol} {self.ports}".strip()
        return f"{what} from {FirewallSource(self.source).label}"
