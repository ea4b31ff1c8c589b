"""Pages and form posts. Each view parses input, asks the access policy (through a
selector or ``labs.access``), calls one service and maps its refusal once
(``say_refusal``, ``form_refusal``)."""

import functools
import time

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connection
from django.http import Http404, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from labs import access, selectors
from labs.access import Action
from labs.choices import GroupStatus, ObservedState, Role
from labs.compute import bulk as bulk_services
from labs.compute import clock, idle, kinds, requests, term
from labs.compute import usage as usage_hours
from labs.consoles import leases, rules, tickets
from labs.errors import StratusError, message_of
from labs.forms import (
    AccountResetForm,
    BulkActionForm,
    GroupEditForm,
    GroupKeyForm,
    GroupSignupForm,
)
from labs.live import pagecache, regions
from labs.live.events import MEMBERS, STAFF
from labs.people import groups as group_services
from labs.people.tokens import account_tokens
from labs.throttle import Throttled, client_address, throttle_hit


def say_refusal(request, error: Exception) -> None:
    """A service's refusal as the flash message the next page shows."""
    messages.error(request, message_of(error))


def form_refusal(form, error: Exception) -> None:
    """A service's refusal on the form that asked: field errors where they belong."""
    if isinstance(error, StratusError):
        form.add_error(None, error.message)
    else:
        form.add_error(None, error)


@login_required
def home(request):
    memberships = selectors.memberships_of(user=request.user)
    return render(request, "labs/home.html", {"memberships": memberships})


@login_required
@require_http_methods(["GET", "POST"])
def group_signup(request, slug: str):
    membership = selectors.course_membership(user=request.user, slug=slug)
    course = membership.course
    if membership.group_id is not None:
        return redirect("labs:group_detail", group_id=membership.group_id)
    form = GroupSignupForm(request.POST or None)
    can_sign_up = membership.role == Role.STUDENT and course.is_signup_open
    if request.method == "POST" and can_sign_up and form.is_valid():
        data = form.cleaned_data
        try:
            group = group_services.group_register(
                course=course,
                by=request.user,
                name=data["name"],
                member_usernames=group_services.usernames_parse(text=data["members"]),
                project_title=data["project_title"],
                project_idea=data["project_idea"],
                ssh_public_key=data["ssh_public_key"],
            )
        except (ValidationError, StratusError) as error:
            form_refusal(form, error)
        else:
            messages.success(request, "Your group is signed up and waits for review.")
            return redirect("labs:group_detail", group_id=group.pk)
    return render(
        request,
        "labs/group_signup.html",
        {"course": course, "membership": membership, "form": form, "can_sign_up": can_sign_up},
    )


@login_required
def group_detail(request, group_id: int):
    at = time.time()  # live.js: a push rendered before this is older than the page
    early = pagecache.group_versions(group_id)  # before the group: see pagecache
    group = selectors.group_head_for_viewer(user=request.user, group_id=group_id)
    # The shared regions as this viewer's audience sees them (labs/live/regions.py pushes
    # the same; kept in the page cache until a change touches them), then the viewer's
    # own part: their hours. The selector let the viewer in: a student member of the
    # group, or else course staff (a student of the course is in one group at most, staff
    # in none). A part that must be rendered reads the whole group first.
    staff = request.user.is_superuser or not group.viewer_is_member
    token = get_token(request)

    @functools.cache
    def whole():
        loaded = selectors.group_for_push(group_id=group.pk)
        if loaded is None:  # deleted since the head was read
            raise Http404("No such group.")
        return loaded

    parts = {"shared": regions.group_entry(group=group, staff=staff, early=early, load=whole)}
    if group.status == GroupStatus.APPROVED:
        parts["hours"] = (
            None
            if early is None
            else f"hours:{group.pk}:{request.user.pk}:{early}:"
            f"{pagecache.span(pagecache.HOURS_SECONDS)}",
            min(pagecache.HOURS_SECONDS, pagecache.seconds() * 2),
            lambda: render_to_string(
                "labs/_group_hours.html",
                {"hours": usage_hours.group_hours(group=whole(), user=request.user)},
            ).strip(),
        )
    found = pagecache.cached_many(parts)  # one round trip for both
    context = {
        "group": group,
        "audience": STAFF if staff else MEMBERS,
        "region": {
            key.replace("-", "_"): pagecache.for_page(html, token)
            for key, html in found["shared"].items()
        },
        "hours": found.get("hours"),
    }
    return _render_live(request, "labs/group_detail.html", context, at=at)


def _render_live(request, template: str, context: dict, *, at: float, status: int = 200):
    """Render a page that live.js keeps up to date (docs/live-updates.md).

    ``at``: when the page's reads began; live.js ignores pushes rendered before it (and a
    fetch older than a push it holds). live.js fetches the page once after each
    (re)connect; such a fetch must not use up the flash messages meant for the next real
    page load.
    """
    context["live_at"] = f"{at:.6f}"
    response = render(request, template, context, status=status)
    response["X-Live-At"] = context["live_at"]
    if request.headers.get("X-Live-Refresh"):
        messages.get_messages(request).used = False
    return response


@login_required
@require_http_methods(["GET", "POST"])
def group_edit(request, group_id: int):
    group = selectors.group_for_member(user=request.user, group_id=group_id)
    form = GroupEditForm(
        request.POST or None,
        initial={"project_title": group.project_title, "project_idea": group.project_idea},
    )
    if request.method == "POST" and form.is_valid():
        was_rejected = group.status == GroupStatus.REJECTED
        try:
            group_services.group_update(
                group=group,
                by=request.user,
                project_title=form.cleaned_data["project_title"],
                project_idea=form.cleaned_data["project_idea"],
            )
        except (ValidationError, StratusError) as error:
            form_refusal(form, error)
        else:
            messages.success(
                request, "Saved and resubmitted for review." if was_rejected else "Saved."
            )
            return redirect("labs:group_detail", group_id=group.pk)
    return render(request, "labs/group_edit.html", {"group": group, "form": form})


@login_required
@require_POST
def group_confirm(request, group_id: int):
    """A named member says yes to the pending group."""
    group = selectors.group_for_member(user=request.user, group_id=group_id)
    try:
        group_services.membership_confirm(group=group, by=request.user)
    except (ValidationError, StratusError) as error:
        say_refusal(request, error)
    else:
        messages.success(request, f"You confirmed that you are in “{group.name}”.")
    return redirect("labs:home")


@login_required
@require_POST
def group_decline(request, group_id: int):
    """A named member leaves the pending group."""
    group = selectors.group_for_member(user=request.user, group_id=group_id)
    try:
        group_services.membership_decline(group=group, by=request.user)
    except (ValidationError, StratusError) as error:
        say_refusal(request, error)
    else:
        messages.success(request, f"You left “{group.name}”; you may join or sign up another.")
    return redirect("labs:home")


@login_required
@require_POST
def group_key(request, group_id: int):
    group = selectors.group_for_member(user=request.user, group_id=group_id)
    form = GroupKeyForm(request.POST)
    if form.is_valid():
        was_rejected = group.status == GroupStatus.REJECTED
        try:
            group_services.group_key_replace(
                group=group, by=request.user, ssh_public_key=form.cleaned_data["ssh_public_key"]
            )
        except (ValidationError, StratusError) as error:
            form_refusal(form, error)
        else:
            if was_rejected:
                done = "Key replaced and group resubmitted for review."
            elif group.status == GroupStatus.APPROVED:
                done = (
                    "Key replaced. Your running VMs take it within seconds, and the old key "
                    "stops working there; stopped VMs take it when they start."
                )
            else:
                done = "Key replaced."
            messages.success(request, done)
            return redirect("labs:group_detail", group_id=group.pk)
    return render(request, "labs/group_key.html", {"group": group, "form": form}, status=400)


@login_required
@require_POST
def vm_add(request, group_id: int):
    group = selectors.group_for_viewer(user=request.user, group_id=group_id)
    try:
        vm = requests.vm_create(group=group, by=request.user)
    except StratusError as error:
        say_refusal(request, error)
    else:
        messages.success(request, f"{vm.name} is being created.")
    return redirect("labs:group_detail", group_id=group.pk)


@login_required
@require_POST
def vm_operation(request, vm_id: int, kind: str):
    vm = selectors.vm_for_user(user=request.user, vm_id=vm_id)
    entry = kinds.requestable(kind)
    if entry is None:
        raise Http404("No such operation.")
    # Only the kinds that take a snapshot name read one; the others take nothing.
    takes_name = entry.params != kinds.Params.NONE
    params = {"name": request.POST.get("name", "")} if takes_name else {}
    try:
        op = requests.vm_operation_request(vm=vm, kind=kind, by=request.user, params=params)
    except StratusError as error:
        say_refusal(request, error)
    else:
        op.refresh_from_db(fields=["send_error"])
        later = "; it starts when the task queue is back" if op.send_error else ""
        messages.success(request, f"{op.get_kind_display()} of {vm.name} is queued{later}.")
    if request.POST.get("then") == "console":  # the console page's Resume button
        return redirect("labs:vm_console", vm_id=vm.pk)
    return redirect("labs:group_detail", group_id=vm.group_id)


@login_required
@require_POST
def vm_keep_running(request, vm_id: int):
    """The idle warning's "Keep running" (labs/compute/idle.py)."""
    vm = selectors.vm_for_user(user=request.user, vm_id=vm_id)
    try:
        until = idle.vm_keep_running(vm=vm, by=request.user)
    except StratusError as error:
        say_refusal(request, error)
    else:
        local = until.astimezone(clock.zone_of(vm.group.course))
        messages.success(request, f"{vm.name} keeps running at least until {local:%H:%M}.")
    return redirect("labs:group_detail", group_id=vm.group_id)


@login_required
def vm_console(request, vm_id: int):
    vm = selectors.vm_for_user(user=request.user, vm_id=vm_id)
    can_observe = access.may(request.user, Action.OBSERVE, vm)
    view_only = can_observe and request.GET.get("mode") == "view"
    config = rules.client_config(
        vm=vm,
        view_only=view_only,
        ticket_url=reverse("labs:vm_console_ticket", args=[vm.pk]),
    )
    return render(
        request,
        "labs/vm_console.html",
        {"vm": vm, "can_observe": can_observe, "view_only": view_only, "console": config},
    )


@login_required
@require_POST
def vm_console_ticket(request, vm_id: int):
    """A single-use console ticket for this user, VM and browser session (JSON)."""
    vm = selectors.vm_for_user(user=request.user, vm_id=vm_id)
    if vm.observed_state != ObservedState.RUNNING:
        return JsonResponse({"error": f"{vm.name} is not running."}, status=409)
    view_only = request.POST.get("mode") == "view"
    if view_only and not access.may(request.user, Action.OBSERVE, vm):
        view_only = False  # observe mode is for course staff; members always drive
    try:
        throttle_hit(
            scope="ticket",
            keys=[f"user:{request.user.pk}", f"ip:{client_address(request)}"],
            limit=settings.TICKETS_PER_MINUTE,
            window=60,
            what="console tickets",
            unavailable=leases.tickets_unavailable().message,
        )
        if (too_many := leases.console_cap_message(user_id=request.user.pk)) is not None:
            return JsonResponse({"error": too_many}, status=429)
        token = tickets.ticket_issue(
            user=request.user, vm=vm, session_key=request.session.session_key, view_only=view_only
        )
    except StratusError as error:  # Redis, where tickets and leases live, is away
        return JsonResponse({"error": error.message}, status=error.http_status)
    response = JsonResponse(
        {"ticket": token, "expires_in": settings.CONSOLE_TICKET_TTL, "view_only": view_only}
    )
    response["Cache-Control"] = "no-store"
    return response


class AccountResetView(auth_views.PasswordResetView):
    """Django's reset page with the invitation-aware form and token generator, and
    throttled: per address with a clear message, per account silently (the page must not
    say whether an address exists)."""

    form_class = AccountResetForm
    token_generator = account_tokens

    def form_valid(self, form):
        try:
            throttle_hit(
                scope="reset",
                keys=[f"ip:{client_address(self.request)}"],
                limit=settings.RESETS_PER_HOUR * 4,
                window=3600,
                what="password-reset mails from your address",
            )
        except StratusError as error:
            form.add_error(None, error.message)
            return self.form_invalid(form)
        try:
            email = form.cleaned_data["email"].lower()
            throttle_hit(
                scope="reset",
                keys=[f"email:{email}"],
                limit=settings.RESETS_PER_HOUR,
                window=3600,
                what="password-reset mails",
            )
        except Throttled:
            return redirect(self.get_success_url())  # as if sent: no mail, no tell
        return super().form_valid(form)


@require_http_methods(["GET", "HEAD"])
def healthz(request):
    """For load balancers and the container healthcheck: the process answers and its
    database does. Says nothing else."""
    try:
        connection.ensure_connection()
    except DatabaseError:
        return HttpResponse("database unavailable\n", status=503, content_type="text/plain")
    return HttpResponse("ok\n", content_type="text/plain")


# --- course staff: the overview and its bulk actions ---------------------------------------


def _overview_page(request, course, form: BulkActionForm, status: int = 200):
    """The overview: its regions (the same renderings the publisher pushes), the bulk
    form, the final snapshots and the usage, each from the page cache while nothing
    touched them (labs/live/pagecache.py); a form sent back with its errors is this
    viewer's own and rendered for this page only."""
    at = time.time()
    token = get_token(request)
    seconds = pagecache.seconds()
    names = pagecache.course_versions(course)  # once, for every part's key

    def key(part: str) -> str | None:
        return pagecache.course_key(course, part, names=names)

    entries = {
        "regions": regions.course_entry(course=course, names=names),
        "final": (
            key("final"),
            seconds,
            lambda: render_to_string(
                "labs/_course_final.html",
                {"course": course, "final_snapshots": term.final_snapshots(course)},
            ),
        ),
        "usage": (  # hours grow with the clock: kept a minute at most
            key("usage"),
            min(pagecache.HOURS_SECONDS, seconds * 2),
            lambda: render_to_string(
                "labs/_course_usage.html",
                {"course": course, "usage": usage_hours.course_report(course=course)},
            ),
        ),
    }
    if not form.is_bound:  # a form sent back with its errors is this viewer's own
        entries["bulk"] = (
            key("bulk"),
            seconds,
            lambda: _overview_bulk(course, BulkActionForm(), token=None),
        )
    found = pagecache.cached_many(entries)  # one round trip for all
    parts = {**found.pop("regions"), **found}
    if form.is_bound:
        parts["bulk"] = _overview_bulk(course, form, token=token)
    context = {
        "course": course,
        "part": {key: pagecache.for_page(html, token) for key, html in parts.items()},
    }
    return _render_live(request, "labs/course_overview.html", context, at=at, status=status)


def _overview_bulk(course, form: BulkActionForm, *, token: str | None) -> str:
    """The bulk form's section: with this viewer's token and choices (a form sent back),
    or unbound with the token's slot, the same for every staff member."""
    groups = selectors.groups_of_course(course=course, status=GroupStatus.APPROVED)
    context = {
        "course": course,
        "approved_groups": list(groups),
        "form": form,
        "kinds": form.fields["kind"].choices,
        "scopes": BulkActionForm.SCOPES,
        "chosen": {
            "kind": form["kind"].value() or "",
            "scope": form["scope"].value() or "selected",
            "groups": form.selected if form.is_bound else set(),
            "confirm_reset": bool(form["confirm_reset"].value()),
        },
        **(pagecache.slot_context() if token is None else {"csrf_token": token}),
    }
    return render_to_string("labs/_course_bulk.html", context)


@login_required
@require_http_methods(["GET", "HEAD"])
def course_overview(request, slug: str):
    course = selectors.course_for_staff(user=request.user, slug=slug)
    return _overview_page(request, course, BulkActionForm())


@login_required
@require_POST
def course_bulk(request, slug: str):
    course = selectors.course_for_staff(user=request.user, slug=slug)
    groups = selectors.groups_of_course(course=course, status=GroupStatus.APPROVED)
    form = BulkActionForm(request.POST, groups=groups)
    if not form.is_valid():
        return _overview_page(request, course, form, status=400)
    try:
        result = bulk_services.vms_bulk_request(
            course=course,
            kind=form.cleaned_data["kind"],
            by=request.user,
            group_ids=form.group_ids,
        )
    except StratusError as error:
        say_refusal(request, error)
    else:
        (messages.success if result.queued else messages.error)(request, result.summary())
    return redirect("labs:course_overview", slug=course.slug)
