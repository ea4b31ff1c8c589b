"""Form posts for block volumes (labs/compute/volumes.py): add one to a VM, attach,
detach, delete. Each parses the form, finds the VM and the volume through the access
seam (another group's is a 404), calls one service and maps its refusal once."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from labs import selectors
from labs.compute import volumes
from labs.errors import Invalid, StratusError
from labs.views import say_refusal


def _queued(request, op, what: str) -> None:
    op.refresh_from_db(fields=["send_error"])
    later = "; it starts when the task queue is back" if op.send_error else ""
    messages.success(request, f"{what} is queued{later}.")


def _int(value, what: str) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise Invalid(f"{what} must be a whole number.") from None


@login_required
@require_POST
def vm_volume_add(request, vm_id: int):
    vm = selectors.vm_for_user(user=request.user, vm_id=vm_id)
    try:
        size = _int(request.POST.get("size_gib"), "The size")
        op = volumes.volume_create_request(
            vm=vm, name=request.POST.get("name", ""), size_gib=size, by=request.user
        )
    except StratusError as error:
        say_refusal(request, error)
    else:
        _queued(request, op, f"Volume {op.params['name']} for {vm.name}")
    return redirect("labs:group_detail", group_id=vm.group_id)


@login_required
@require_POST
def vm_volume_attach(request, vm_id: int):
    vm = selectors.vm_for_user(user=request.user, vm_id=vm_id)
    try:
        volume_id = _int(request.POST.get("volume"), "The volume")
    except StratusError as error:
        say_refusal(request, error)
        return redirect("labs:group_detail", group_id=vm.group_id)
    volume = volumes.volume_for_user(user=request.user, volume_id=volume_id)
    try:
        op = volumes.volume_attach_request(volume=volume, vm=vm, by=request.user)
    except StratusError as error:
        say_refusal(request, error)
    else:
        _queued(request, op, f"Attaching {volume.name} to {vm.name}")
    return redirect("labs:group_detail", group_id=vm.group_id)


@login_required
@require_POST
def volume_detach(request, volume_id: int):
    volume = volumes.volume_for_user(user=request.user, volume_id=volume_id)
    try:
        op = volumes.volume_detach_request(volume=volume, by=request.user)
    except StratusError as error:
        say_refusal(request, error)
    else:
        _queued(request, op, f"Detaching {volume.name} from {op.vm.name}")
    return redirect("labs:group_detail", group_id=volume.group_id)


@login_required
@require_POST
def volume_delete(request, volume_id: int):
    volume = volumes.volume_for_user(user=request.user, volume_id=volume_id)
    try:
        volumes.volume_delete_request(volume=volume, by=request.user)
    except StratusError as error:
        say_refusal(request, error)
    else:
        messages.success(request, f"Deleting volume {volume.name} is queued.")
    return redirect("labs:group_detail", group_id=volume.group_id)
