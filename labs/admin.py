"""The Django admin is the instructors' panel.

Superusers see and edit everything. Instructors and TAs (staff accounts with a TA or
instructor membership) see the courses they teach, their rosters and groups, and review
groups through the approve/reject actions; everything else stays with superusers.
"""

from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from labs import access
from labs.admin_images import TemplateImageMixin, capture, may_capture
from labs.admin_shares import may_share, share_put
from labs.choices import DesiredState
from labs.compute import quotas
from labs.compute.moves import vm_move_request
from labs.compute.placement import hosts_with_usage, usage_of
from labs.errors import StratusError, message_of
from labs.forms import MoveForm, RejectForm, RolloverForm
from labs.models import (
    ClassHoliday,
    ClassSession,
    Course,
    FirewallRule,
    Group,
    Host,
    Membership,
    Operation,
    Snapshot,
    Vm,
    VmTemplate,
    Volume,
)
from labs.people import groups as group_services
from labs.people.rollover import course_rollover


def quota_caps(course: Course) -> dict[str, int]:
    """How far an instructor may raise a group's quotas: the caps a superuser set on the
    course."""
    return {
        field: getattr(course, f"quota_cap_{field.removeprefix('quota_')}")
        for field in GroupAdmin.quota_fields
    }


def _is_course_staff(request) -> bool:
    """Staff of at least one course (the access policy's one definition); Django's admin
    site has already required ``is_staff`` to let the user in at all."""
    return access.is_staff_anywhere(user=request.user)


class CourseScopedAdmin(admin.ModelAdmin):
    """Read access for a course's staff to rows of the courses they teach (the rows come
    through ``access.restrict``)."""

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        if request.user.is_superuser:
            return qs
        return access.restrict(qs, user=request.user, action=access.Action.REVIEW)

    def has_module_permission(self, request):
        return request.user.is_superuser or _is_course_staff(request)

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser or _is_course_staff(request)

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser


def _may_schedule(request, course) -> bool:
    """The course's instructors (and superusers) edit its class schedule."""
    return course is not None and access.may(request.user, access.Action.SCHEDULE, course)


class ScheduleInline(admin.TabularInline):
    """A course's class schedule: editable by its instructors, visible to its TAs."""

    extra = 0

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser or _is_course_staff(request)

    def has_add_permission(self, request, obj=None):
        return request.user.is_superuser or _may_schedule(request, obj)

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser or _may_schedule(request, obj)

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser or _may_schedule(request, obj)


class ClassSessionInline(ScheduleInline):
    model = ClassSession
    fields = ["label", "weekday", "date", "starts_at", "ends_at", "valid_from", "valid_until"]
    verbose_name = "class"
    verbose_name_plural = "classes (weekly: a weekday; once: a date; times in the course's zone)"


class ClassHolidayInline(ScheduleInline):
    model = ClassHoliday
    fields = ["first_day", "last_day", "label"]
    verbose_name = "day without class"
    verbose_name_plural = "days without class (holidays)"


@admin.register(Course)
class CourseAdmin(CourseScopedAdmin):
    list_display = ["slug", "title", "term", "max_group_size", "signup_open", "group_count"]
    search_fields = ["slug", "title", "term"]
    prepopulated_fields = {"slug": ["title"]}
    inlines = [ClassSessionInline, ClassHolidayInline]
    # What the course's instructors set (labs/compute/clock.py, idle.py, usage.py, term.py;
    # docs/course-clock.md), each part in its own fieldset; every other field stays the
    # administrators'.
    instructor_fieldsets = [
        ("Course clock", ["time_zone", "clock_lead_minutes", "clock_after"]),
        (
            "Idle machines",
            ["idle_minutes", "idle_warn_minutes", "idle_action", "idle_cpu_percent"],
        ),
        ("Usage hours", ["hours_quota", "hours_per_student", "hours_exclude_class"]),
        ("Deadline and end of term", ["deadline_at", "term_ends_at", "term_warning_days"]),
        ("Published ports", ["published_ports_per_group", "forbidden_guest_ports"]),
        ("Shared files", ["shares"]),
    ]
    instructor_fields = [f for _, fields in instructor_fieldsets for f in fields]

    def has_change_permission(self, request, obj=None):
        # Instructors edit the class schedule and the clock's settings (every other field
        # stays read-only); TAs only view the course.
        if request.user.is_superuser:
            return True
        if obj is None:
            return access.courses_staffed_by(
                user=request.user, action=access.Action.SCHEDULE
            ).exists()
        return _may_schedule(request, obj)

    def get_readonly_fields(self, request, obj=None):
        if request.user.is_superuser:
            return self.readonly_fields
        every = [f.name for f in Course._meta.fields if f.editable and f.name != "id"]
        if _may_schedule(request, obj):
            return [f for f in every if f not in self.instructor_fields]
        return every

    def get_fieldsets(self, request, obj=None):
        """Django's one fieldset of every field, with the instructors' parts in their own."""
        (name, options), *rest = super().get_fieldsets(request, obj)
        fields = [f for f in options["fields"] if f not in self.instructor_fields]
        return [
            (name, {**options, "fields": fields}),
            *rest,
            *((title, {"fields": part}) for title, part in self.instructor_fieldsets),
        ]

    def get_prepopulated_fields(self, request, obj=None):
        return self.prepopulated_fields if request.user.is_superuser else {}

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(n_groups=Count("groups"))

    @admin.display(description="groups", ordering="n_groups")
    def group_count(self, obj):
        return obj.n_groups

    @admin.display(description="signup open", boolean=True)
    def signup_open(self, obj):
        return obj.is_signup_open

    # Next term's course (labs/people/rollover.py): superusers only.
    # The course share's files (labs/admin_shares.py): its instructors.
    actions = ["rollover", share_put]

    def has_rollover_permission(self, request):
        return request.user.is_superuser

    def has_share_permission(self, request):
        return may_share(request)

    @admin.action(description="Roll over to a new term", permissions=["rollover"])
    def rollover(self, request, queryset):
        form = RolloverForm(request.POST if "new_slug" in request.POST else None)
        if queryset.count() != 1:
            self.message_user(request, "Roll over one course at a time.", level=messages.ERROR)
            return None
        course = queryset.get()
        if form.is_valid():
            try:
                new = course_rollover(
                    course=course,
                    slug=form.cleaned_data["new_slug"],
                    term=form.cleaned_data["term"],
                    by=request.user,
                )
            except (StratusError, ValidationError) as error:
                self.message_user(request, message_of(error), level=messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"Created {new.slug} ({new.term}) from {course.slug}: set its signup "
                    "dates, deadline and end of term.",
                )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": f"Roll {course.slug} over to a new term",
            "course": course,
            "form": form,
            "opts": self.model._meta,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/labs/course/rollover.html", context)


@admin.register(Membership)
class MembershipAdmin(CourseScopedAdmin):
    list_display = ["user", "full_name", "email", "course", "role", "group"]
    list_filter = [("course", admin.RelatedOnlyFieldListFilter), "role"]
    search_fields = ["user__username", "user__email", "user__first_name", "user__last_name"]
    list_select_related = ["user", "course", "group"]
    autocomplete_fields = ["user", "group"]

    def save_model(self, request, obj, form, change):
        if change and "group" in form.changed_data:
            # Group moves go through the service: it checks them and revokes consoles.
            new_group = obj.group
            obj.group_id = form.initial.get("group")
            super().save_model(request, obj, form, change)
            group_services.membership_group_set(membership=obj, group=new_group, by=request.user)
        else:
            super().save_model(request, obj, form, change)

    @admin.display(ordering="user__last_name")
    def full_name(self, obj):
        return obj.user.get_full_name()

    @admin.display(ordering="user__email")
    def email(self, obj):
        return obj.user.email


class MemberInline(admin.TabularInline):
    model = Membership
    fields = ["user", "full_name", "email", "role", "confirmed_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name = "member"
    verbose_name_plural = "members"

    def has_add_permission(self, request, obj=None):
        return False

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser or _is_course_staff(request)

    @admin.display
    def full_name(self, obj):
        return obj.user.get_full_name()

    @admin.display
    def email(self, obj):
        return obj.user.email


@admin.register(Group)
class GroupAdmin(CourseScopedAdmin):
    list_display = ["name", "course", "status", "member_list", "project_title", "created_at"]
    list_filter = [("course", admin.RelatedOnlyFieldListFilter), "status"]
    search_fields = ["name", "project_title", "memberships__user__username"]
    list_select_related = ["course"]
    inlines = [MemberInline]
    actions = ["approve", "reject"]
    readonly_fields = [
        "status",
        "ssh_public_key",
        "ssh_key_type",
        "ssh_key_bits",
        "ssh_key_fingerprint",
        "reviewed_by",
        "reviewed_at",
        "review_note",
        "created_by",
        "created_at",
        "updated_at",
        "hours_warned_at",
    ]
    quota_fields = ["quota_vms", "quota_vcpus", "quota_memory_mib", "quota_disk_gib"]
    fieldsets = [
        (None, {"fields": ["course", "name", "status", "project_title", "project_idea"]}),
        (
            "Quota overrides (empty: the course's VM template)",
            {"fields": ["quota_vms", "quota_vcpus", "quota_memory_mib", "quota_disk_gib"]},
        ),
        (
            "SSH key",
            {"fields": ["ssh_key_fingerprint", "ssh_key_type", "ssh_key_bits", "ssh_public_key"]},
        ),
        ("Usage hours", {"fields": ["extra_hours", "hours_warned_at"]}),
        ("Review", {"fields": ["reviewed_by", "reviewed_at", "review_note"]}),
        ("History", {"fields": ["created_by", "created_at", "updated_at"]}),
    ]
    # What an instructor of the group's course may change (Action.QUOTA); TAs none.
    hours_fields = ["extra_hours"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("memberships__user")

    def has_change_permission(self, request, obj=None):
        # Instructors may raise a group's quotas (up to the course's caps); every other
        # field stays read-only, and for TAs everything does.
        return request.user.is_superuser or _is_course_staff(request)

    def get_readonly_fields(self, request, obj=None):
        if request.user.is_superuser:
            return self.readonly_fields
        every = [f for _, opts in self.fieldsets for f in opts["fields"]]
        if obj is not None and access.may(request.user, access.Action.QUOTA, obj.course):
            return [f for f in every if f not in self.quota_fields + self.hours_fields]
        return every

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        user = request.user

        class CappedForm(form):
            """Quotas an instructor sets stay within the course's caps; empty extra hours
            are none."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                if "extra_hours" in self.fields:
                    self.fields["extra_hours"].required = False

            def clean_extra_hours(self):
                return self.cleaned_data.get("extra_hours") or 0

            def clean(self):
                data = super().clean()
                if user.is_superuser or obj is None:
                    return data
                caps = quota_caps(obj.course)
                for field in GroupAdmin.quota_fields:
                    value = data.get(field)
                    if value is not None and value > caps[field]:
                        self.add_error(
                            field,
                            f"At most {caps[field]} for this course; a superuser sets the "
                            "course's caps.",
                        )
                return data

        return CappedForm

    def get_search_results(self, request, queryset, search_term):
        queryset, _ = super().get_search_results(request, queryset, search_term)
        return queryset.distinct(), False

    @admin.display(description="members (? = not confirmed yet)")
    def member_list(self, obj):
        return ", ".join(
            m.user.username + ("" if m.confirmed_at else "?") for m in obj.memberships.all()
        )

    def has_review_permission(self, request):
        return request.user.is_superuser or _is_course_staff(request)

    @admin.action(description="Approve the selected groups", permissions=["review"])
    def approve(self, request, queryset):
        done = self._review_each(request, queryset, group_services.group_approve, note="")
        if done:
            self.message_user(request, f"Approved {done} group(s); members were emailed.")

    @admin.action(description="Reject the selected groups (with a note)", permissions=["review"])
    def reject(self, request, queryset):
        form = RejectForm(request.POST if "note" in request.POST else None)
        if form.is_valid():
            done = self._review_each(
                request, queryset, group_services.group_reject, note=form.cleaned_data["note"]
            )
            if done:
                self.message_user(request, f"Rejected {done} group(s); members were emailed.")
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Reject groups",
            "groups": queryset,
            "form": form,
            "opts": self.model._meta,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/labs/group/reject.html", context)

    def _review_each(self, request, queryset, review, *, note: str) -> int:
        done = 0
        for group in queryset.select_related("course"):
            try:
                review(group=group, by=request.user, note=note)
            except (ValidationError, StratusError) as error:
                self.message_user(
                    request, f"{group.name}: {message_of(error)}", level=messages.ERROR
                )
            else:
                done += 1
        return done


class HostVmInline(admin.TabularInline):
    """The host's live VMs, read-only: moves go through the move action of the VMs' list."""

    model = Vm
    fields = ["vm", "observed_state", "desired_state", "vcpus", "memory_mib", "disk_gib"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name = "VM on this host"
    verbose_name_plural = "VMs on this host"

    def get_queryset(self, request):
        return super().get_queryset(request).live().select_related("group")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="VM")
    def vm(self, obj):
        return str(obj)


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "uri",
        "enabled",
        "draining",
        "virt_type",
        "network_mode",
        "vm_count",
        "usage",
        "state",
        "last_seen_at",
    ]
    list_editable = ["draining"]
    list_filter = ["enabled", "draining", "virt_type", "network_mode"]
    search_fields = ["name", "uri"]
    readonly_fields = ["state", "last_seen_at", "unreachable_since", "last_error"]
    inlines = [HostVmInline]

    def get_queryset(self, request):
        # Usage and VM count in the list's one query (a query per row before).
        return hosts_with_usage(super().get_queryset(request))

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []  # a new host holds no VM

    @admin.display(description="state")
    def state(self, obj):
        """Up, disabled, draining or "unreachable since 14:03": what placement sees."""
        return obj.state_label

    @admin.display(description="VMs", ordering="live_vms")
    def vm_count(self, obj):
        """Its live VMs of every course, linked to the VMs' list filtered by the host."""
        url = reverse("admin:labs_vm_changelist")
        query = f"?host__id__exact={obj.pk}&{LiveFilter.parameter_name}=no"
        return format_html('<a href="{}{}">{}</a>', url, query, obj.live_vms)

    @admin.display(description="used / available (vCPU, MiB, GiB)")
    def usage(self, obj):
        usage = usage_of(obj)
        parts = (usage.vcpus, usage.memory_mib, usage.disk_gib)
        return ", ".join(f"{used}/{available}" for used, available in parts)


@admin.register(VmTemplate)
class VmTemplateAdmin(TemplateImageMixin, CourseScopedAdmin):
    list_display = ["course", "image", "count", "vcpus", "memory_mib", "disk_gib", "quota_vms"]
    list_select_related = ["course", "image"]


class OperationInline(admin.TabularInline):
    model = Operation
    fields = ["created_at", "kind", "status", "requested_by", "progress", "error"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-created_at"]

    def has_add_permission(self, request, obj=None):
        return False

    def has_view_permission(self, request, obj=None):
        return request.user.is_superuser or _is_course_staff(request)


class LiveFilter(admin.SimpleListFilter):
    """Deleted VMs keep their row (the audit trail) and their last host."""

    title = "deleted"
    parameter_name = "deleted"

    def lookups(self, request, model_admin):
        return [("no", "Not deleted"), ("yes", "Deleted")]

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.exclude(desired_state=DesiredState.DELETED)
        if self.value() == "yes":
            return queryset.filter(desired_state=DesiredState.DELETED)
        return queryset


@admin.register(Vm)
class VmAdmin(CourseScopedAdmin):
    list_display = [
        "__str__",
        "host",
        "observed_state",
        "desired_state",
        "ssh_port",
        "status_message",
    ]
    list_filter = [
        ("group__course", admin.RelatedOnlyFieldListFilter),
        "observed_state",
        "host",
        LiveFilter,
    ]
    search_fields = ["name", "group__name", "uuid"]
    list_select_related = ["group", "host"]
    # Where the VM runs and how it is reached are what the workers observed: the consoles
    # connect to the recorded VNC endpoint and students to the SSH port, so an edit here
    # could point one group's console or SSH line at another group's VM. Moves go
    # through the migrate operation, endpoints through the workers (labs/compute/records.py).
    readonly_fields = [
        "uuid",
        "instance_id",
        "host",
        "ssh_port",
        "vnc_host",
        "vnc_port",
        "vnc_socket",
        "observed_state",
        "observed_at",
        "status_message",
        "created_at",
    ]
    inlines = [OperationInline]
    actions = ["move", capture]

    def has_capture_permission(self, request):
        return may_capture(request)

    def has_move_permission(self, request):
        # The rows are the course's (get_queryset); vm_move_request asks the access
        # policy again for each VM (instructors of its course and superusers).
        return request.user.is_superuser or _is_course_staff(request)

    @admin.action(description="Move the selected VMs to another host", permissions=["move"])
    def move(self, request, queryset):
        form = MoveForm(request.POST if "host" in request.POST else None)
        if form.is_valid():
            to, asked = form.cleaned_data["host"], 0
            for vm in queryset.select_related("group", "host"):
                try:
                    vm_move_request(vm=vm, to=to, by=request.user)
                except StratusError as error:
                    self.message_user(request, f"{vm}: {message_of(error)}", level=messages.ERROR)
                else:
                    asked += 1
            if asked:
                self.message_user(
                    request, f"Asked for {asked} move(s) to {to.name}; each VM's page shows it."
                )
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Move VMs to another host",
            "vms": queryset.select_related("group", "host"),
            "form": form,
            "opts": self.model._meta,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/labs/vm/move.html", context)


@admin.register(Operation)
class OperationAdmin(CourseScopedAdmin):
    list_display = ["created_at", "vm", "kind", "status", "requested_by", "progress", "error"]
    list_filter = ["status", "kind", ("vm__group__course", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["vm__name", "vm__group__name", "requested_by__username"]
    list_select_related = ["vm__group", "requested_by"]
    date_hierarchy = "created_at"

    def has_change_permission(self, request, obj=None):
        return False  # the audit trail is not edited


@admin.register(Snapshot)
class SnapshotAdmin(CourseScopedAdmin):
    list_display = ["name", "vm", "with_memory", "created_by", "created_at"]
    list_select_related = ["vm__group", "created_by"]


@admin.register(Volume)
class VolumeAdmin(CourseScopedAdmin):
    """Block volumes, read-only: members add, attach, detach and delete them on the group
    page (each an Operation with its audit row); the list shows each group's disk quota
    and what its VMs and volumes use of it."""

    list_display = ["name", "group", "size_gib", "vm", "host", "state", "serial", "disk_quota"]
    list_filter = ["state", ("group__course", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["name", "group__name", "serial"]
    list_select_related = ["group__course", "vm", "host"]
    readonly_fields = [f.name for f in Volume._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # the file is on a host: deleting is a volume_delete Operation

    @admin.display(description="group's disk (used / quota GiB)")
    def disk_quota(self, obj):
        used = quotas.group_usage(group=obj.group)["disk_gib"]
        return f"{used} / {quotas.group_quota(group=obj.group)['disk_gib']}"


@admin.register(FirewallRule)
class FirewallRuleAdmin(CourseScopedAdmin):
    """Every group's firewall rules, read-only: members and the course's staff change
    them on the group page (each change a ``firewall_sync`` Operation on the group's
    hosts: labs/compute/firewall.py), where the staff also lock and unlock them."""

    list_display = ["group", "protocol", "ports", "source", "note", "locked", "created_by"]
    list_filter = [
        "protocol",
        "source",
        "locked",
        ("group__course", admin.RelatedOnlyFieldListFilter),
    ]
    search_fields = ["group__name", "note"]
    list_select_related = ["group__course", "created_by"]
    readonly_fields = [f.name for f in FirewallRule._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # a removal is applied on the hosts: the group page does it
