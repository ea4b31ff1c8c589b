"""Form posts for published ports (labs/compute/ports.py): publish a guest port of a VM,
unpublish one. Each parses the form, finds the VM or the publication through the access
seam (another group's is a 404), calls one service and maps its refusal once."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from labs import selectors
from labs.compute import ports
from labs.errors import StratusError
from labs.views import say_refusal


def _queued(request, op, what: str) -> None:
    op.refresh_from_db(fields=["send_error"])
    later = "; it starts when the task queue is back" if op.send_error else ""
    messages.success(request, f"{what} is queued{later}.")


@login_required
@require_POST
def vm_port_publish(request, vm_id: int):
    vm = selectors.vm_for_user(user=request.user, vm_id=vm_id)
    try:
        op = ports.port_publish_request(
            vm=vm, guest_port=request.POST.get("guest_port"), by=request.user
        )
    except StratusError as error:
        say_refusal(request, error)
    else:
        _queued(
            request,
            op,
            f"Publishing port {op.params['guest_port']} of {vm.name} on port "
            f"{op.params['host_port']}",
        )
    return redirect("labs:group_detail", group_id=vm.group_id)


@login_required
@require_POST
def port_unpublish(request, publication_id: int):
    publication = ports.publication_for_user(user=request.user, publication_id=publication_id)
    try:
        ports.port_unpublish_request(publication=publication, by=request.user)
    except StratusError as error:
        say_refusal(request, error)
    else:
        messages.success(
            request,
            f"Closing port {publication.guest_port} of {publication.vm.name} is queued.",
        )
    return redirect("labs:group_detail", group_id=publication.vm.group_id)
