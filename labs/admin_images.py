"""The admin's course-image parts: the Image pages (import for superusers, copies per host,
deletion refused while in use), the VMs' *Capture as a course image* action and the
template's image switch for the course's instructors. Every write goes through
labs/compute/images.py; refusals come back as admin messages (``message_of``).
"""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect
from django.template.response import TemplateResponse

from labs import access
from labs.access import Action
from labs.compute import images
from labs.compute.image_copies import image_distribute
from labs.errors import StratusError, message_of
from labs.models import Course, Image, ImageCopy


class CaptureForm(forms.Form):
    name = forms.SlugField(
        max_length=Image._meta.get_field("name").max_length,
        help_text="The new image's name (a slug, unique); the course's template can then "
        "switch to it.",
    )
    os = forms.CharField(label="OS", max_length=100, required=False)


class ImportForm(forms.Form):
    path = forms.CharField(
        max_length=1000, help_text="The qcow2 file on this server (an operator's upload)."
    )
    course = forms.ModelChoiceField(Course.objects.all(), required=False)
    name = forms.SlugField(max_length=Image._meta.get_field("name").max_length)
    os = forms.CharField(label="OS", max_length=100, required=False)
    login_user = forms.CharField(max_length=32, initial="student")


def may_capture(request) -> bool:
    """The action is offered to superusers and instructors of some course (not TAs);
    the service asks again for each VM."""
    user = request.user
    return user.is_superuser or access.courses_staffed_by(user=user, action=Action.IMAGE).exists()


@admin.action(description="Capture the selected VM as a course image", permissions=["capture"])
def capture(modeladmin, request, queryset):
    vms = list(queryset.select_related("group__course", "host")[:2])
    if len(vms) != 1:
        modeladmin.message_user(request, "Select one VM to capture.", level=messages.ERROR)
        return None
    vm = vms[0]
    form = CaptureForm(request.POST if "name" in request.POST else None)
    if form.is_valid():
        try:
            data = form.cleaned_data
            name, os_name = data["name"], data["os"]
            images.vm_capture_request(vm=vm, name=name, by=request.user, os_name=os_name)
        except StratusError as error:
            modeladmin.message_user(request, f"{vm}: {message_of(error)}", level=messages.ERROR)
        else:
            modeladmin.message_user(
                request,
                f"Capturing {vm} as {form.cleaned_data['name']}; its operations show how it goes.",
            )
        return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Capture a VM as a course image",
        "vm": vm,
        "form": form,
        "opts": modeladmin.model._meta,
        "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/labs/vm/capture.html", context)


class ImageCopyInline(admin.TabularInline):
    model = ImageCopy
    fields = ["host", "state", "error", "updated_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    list_display = ["name", "course", "source", "os", "size_gib", "copies_present", "created_at"]
    list_filter = ["source", "course"]
    search_fields = ["name", "os"]
    inlines = [ImageCopyInline]
    actions = ["distribute"]
    # What hosts hold and overlays name: never edited once registered.
    readonly_fields = [
        "path",
        "sha256",
        "size_gib",
        "virtual_size",
        "source",
        "everywhere",
        "captured_from",
        "created_by",
        "created_at",
    ]

    @admin.display(description="on hosts")
    def copies_present(self, obj):
        if obj.everywhere:
            return "every host (operator's)"
        return obj.copies.filter(state="present").count()

    def add_view(self, request, form_url="", extra_context=None):
        """Adding an image is importing one: checked, copied into the store, distributed."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = ImportForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                done = images.image_import(
                    path=data["path"],
                    course=data["course"],
                    name=data["name"],
                    os_name=data["os"],
                    login_user=data["login_user"],
                    by=request.user,
                )
            except StratusError as error:
                form.add_error(None, message_of(error))
            else:
                present = sum(1 for c in done.copies if not c.error)
                self.message_user(
                    request,
                    f"Imported {done.image.name} (sha256 {done.image.sha256[:16]}…); on "
                    f"{present} of {len(done.copies)} host(s).",
                )
                return redirect("admin:labs_image_changelist")
        context = {
            **self.admin_site.each_context(request),
            "title": "Import a qcow2 image",
            "form": form,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/labs/image/import.html", context)

    def delete_model(self, request, obj):
        try:
            images.image_delete(image=obj)
        except StratusError as error:
            self.message_user(request, message_of(error), level=messages.ERROR)

    def delete_queryset(self, request, queryset):
        for image in queryset:
            self.delete_model(request, image)

    @admin.action(description="Copy to every host that is up")
    def distribute(self, request, queryset):
        for image in queryset:
            copies = image_distribute(image=image)
            failed = [f"{c.host.name}: {c.error}" for c in copies if c.error]
            level = messages.ERROR if failed else messages.INFO
            self.message_user(request, f"{image.name}: " + ("; ".join(failed) or "copied"), level)


class TemplateImageMixin:
    """The course's instructors switch its template's image (nothing else of it); a
    superuser edits everything. The image list offers the course's and shared images."""

    def _may_switch(self, request, obj) -> bool:
        if obj is None:
            return access.courses_staffed_by(user=request.user, action=Action.IMAGE).exists()
        return access.is_course_staff(user=request.user, course=obj.course_id, action=Action.IMAGE)

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser or self._may_switch(request, obj)

    def get_readonly_fields(self, request, obj=None):
        if request.user.is_superuser:
            return super().get_readonly_fields(request, obj)
        return [f.name for f in self.model._meta.fields if f.name not in ("id", "image")]

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "image" and not request.user.is_superuser:
            courses = access.courses_staffed_by(user=request.user, action=Action.IMAGE)
            kwargs["queryset"] = Image.objects.filter(course__isnull=True) | Image.objects.filter(
                course__in=courses
            )
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request, obj, form, change):
        if change and "image" in form.changed_data:
            image = obj.image
            obj.image_id = form.initial["image"]  # saved by the service, if it agrees
            super().save_model(request, obj, form, change)
            try:
                images.template_image_set(template=obj, image=image, by=request.user)
            except StratusError as error:
                self.message_user(request, message_of(error), level=messages.ERROR)
            return
        super().save_model(request, obj, form, change)
