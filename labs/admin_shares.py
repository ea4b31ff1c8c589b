"""The admin's course-share part: the Courses list's *Put files into the course share*
action, for the course's instructors (and superusers). It shows the files there, takes
new ones (several at once) and removes the ones ticked; every write goes through
labs/compute/shares.py, which checks names, sizes, the course cap and who asks."""

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.template.response import TemplateResponse

from labs import access
from labs.access import Action
from labs.compute import shares
from labs.errors import StratusError, message_of


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        if isinstance(data, list | tuple):
            return [super(MultipleFileField, self).clean(d, initial) for d in data]
        return [super().clean(data, initial)] if data else []


class SharePutForm(forms.Form):
    files = MultipleFileField(
        required=False,
        help_text="Every VM of the course with shared files reads them at /srv/course at "
        "once (read-only). A file of the same name is replaced.",
    )
    remove = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="Remove"
    )

    def __init__(self, *args, present: list[tuple[str, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["remove"].choices = [(n, f"{n} ({size:,} bytes)") for n, size in present]


def may_share(request) -> bool:
    user = request.user
    return user.is_superuser or access.courses_staffed_by(user=user, action=Action.SHARE).exists()


@admin.action(description="Put files into the course share", permissions=["share"])
def share_put(modeladmin, request, queryset):
    courses = list(queryset[:2])
    if len(courses) != 1:
        modeladmin.message_user(request, "Select one course.", level=messages.ERROR)
        return None
    course = courses[0]
    by = None if request.user.is_superuser else request.user
    present = shares.course_share_files(course=course)
    posted = "share_put" in request.POST
    form = SharePutForm(
        request.POST if posted else None, request.FILES if posted else None, present=present
    )
    if posted and form.is_valid():
        uploads = [
            shares.Upload(name=f.name, data=f, size=f.size) for f in form.cleaned_data["files"]
        ]
        removed = form.cleaned_data["remove"]
        try:
            if removed:
                shares.course_share_remove(course=course, names=removed, by=by)
            if uploads:
                shares.course_share_put(course=course, uploads=uploads, by=by)
        except StratusError as error:
            modeladmin.message_user(request, message_of(error), level=messages.ERROR)
        else:
            modeladmin.message_user(
                request,
                f"The share of {course.slug}: {len(uploads)} file(s) put, {len(removed)} removed.",
            )
        return None
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": f"The course share of {course.slug}",
        "course": course,
        "form": form,
        "present": present,
        "cap_mib": settings.COURSE_SHARE_CAP_MIB,
        "file_max_mib": settings.SHARE_FILE_MAX_MIB,
        "opts": modeladmin.model._meta,
        "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/labs/course/share_put.html", context)
