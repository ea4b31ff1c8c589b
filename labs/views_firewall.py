"""Form posts for the group's firewall (labs/compute/firewall.py): add a rule, remove one,
lock or unlock one (the course's staff). Each parses the form, finds the group or the rule
through the access seam (another group's is a 404), calls one service and maps its
refusal once."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from labs import selectors
from labs.compute import firewall
from labs.errors import StratusError
from labs.views import say_refusal


def _back(group_id: int):
    return redirect(reverse("labs:group_detail", kwargs={"group_id": group_id}) + "#firewall")


@login_required
@require_POST
def firewall_rule_add(request, group_id: int):
    group = selectors.group_for_viewer(user=request.user, group_id=group_id)
    try:
        rule = firewall.rule_add(
            group=group,
            by=request.user,
            protocol=request.POST.get("protocol"),
            port_from=request.POST.get("port_from"),
            port_to=request.POST.get("port_to"),
            source=request.POST.get("source"),
            note=request.POST.get("note", ""),
            locked=request.POST.get("locked") == "1",
        )
    except StratusError as error:
        say_refusal(request, error)
    else:
        messages.success(request, f"Opening {rule.label}: it takes effect within seconds.")
    return _back(group.pk)


@login_required
@require_POST
def firewall_rule_remove(request, rule_id: int):
    rule = firewall.rule_for_user(user=request.user, rule_id=rule_id)
    try:
        firewall.rule_remove(rule=rule, by=request.user)
    except StratusError as error:
        say_refusal(request, error)
    else:
        messages.success(request, f"Closing {rule.label}: it takes effect within seconds.")
    return _back(rule.group_id)


@login_required
@require_POST
def firewall_rule_lock(request, rule_id: int):
    rule = firewall.rule_for_user(user=request.user, rule_id=rule_id)
    locked = request.POST.get("locked") == "1"
    try:
        firewall.rule_lock(rule=rule, by=request.user, locked=locked)
    except StratusError as error:
        say_refusal(request, error)
    else:
        messages.success(request, f"{rule.label} is {'locked' if locked else 'unlocked'}.")
    return _back(rule.group_id)
