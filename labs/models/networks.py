"""A group's private network: its subnet (one /24 of ``GROUP_NETWORK_POOL``) and its
VXLAN network identifier, allocated once per group (labs/compute/networks.py)."""

from django.db import models

from labs.models.courses import Group


class GroupNetwork(models.Model):
    group = models.OneToOneField(Group, on_delete=models.CASCADE, related_name="network")
    subnet = models.CharField(max_length=18, unique=True, help_text="e.g. 10.200.3.0/24")
    vni = models.PositiveIntegerField("VXLAN network identifier", unique=True)
    # Each host's own address in the subnet's reserved first /28 ({"<host id>": "10.200.3.1"}):
    # its dnsmasq serves DHCP and DNS there. Distinct per host, because VXLAN makes the
    # hosts' bridges one segment.
    gateways = models.JSONField(default=dict, blank=True)
    # The firewall's last change, and the change each host has applied ({"<host id>":
    # "<iso time of that change>"}): a host behind is given a firewall_sync once one of the
    # group's VMs there is idle (labs/compute/firewall.py, syncs_due_request).
    firewall_wanted_at = models.DateTimeField(null=True, blank=True)
    firewall_applied = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["group"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(vni__gte=1) & models.Q(vni__lte=16_777_215),
                name="group_network_vni_range",
                violation_error_message="A VNI is 1-16777215.",
            )
        ]

    def __str__(self) -> str:
        return f"network of {self.group} ({self.subnet})"

    @property
    def libvirt_name(self) -> str:
        return f"stx-g{self.group_id}"

    @property
    def bridge(self) -> str:
        """The bridge on every host (15 characters at most: "stxg" + 11 digits)."""
        return f"stxg{self.group_id}"
