from django import forms
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import PasswordResetForm

from labs.compute import kinds
from labs.models import Group
from labs.people.tokens import is_invited
from labs.validators import one_line_text

KEY_HELP = (
    "Paste one public key: the single line in your .pub file, for example "
    "~/.ssh/id_ed25519.pub. Create one with: ssh-keygen -t ed25519"
)


class GroupSignupForm(forms.Form):
    name = forms.CharField(
        label="Group name",
        max_length=Group._meta.get_field("name").max_length,
        validators=[one_line_text],
    )
    members = forms.CharField(
        label="Other members",
        required=False,
        max_length=1000,
        help_text="Usernames of your teammates, separated by commas or spaces. "
        "You are a member already.",
    )
    project_title = forms.CharField(
        max_length=Group._meta.get_field("project_title").max_length, validators=[one_line_text]
    )
    project_idea = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6}),
        max_length=Group._meta.get_field("project_idea").max_length,
    )
    ssh_public_key = forms.CharField(
        label="SSH public key",
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "autocomplete": "off"}),
        max_length=16384,
        strip=False,
        help_text=KEY_HELP,
    )


class GroupEditForm(forms.Form):
    project_title = forms.CharField(
        max_length=Group._meta.get_field("project_title").max_length, validators=[one_line_text]
    )
    project_idea = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6}),
        max_length=Group._meta.get_field("project_idea").max_length,
    )


class GroupKeyForm(forms.Form):
    ssh_public_key = forms.CharField(
        label="New SSH public key",
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "autocomplete": "off"}),
        max_length=16384,
        strip=False,
        help_text=KEY_HELP,
    )


class AccountResetForm(PasswordResetForm):
    """Django's reset form, which also reaches an invited account that lost its mail.

    Django skips accounts without a usable password; an invited student has none until
    the first sign-in, and asking here is how they get a new link. Whether an address
    exists is never said (the page answers the same either way).
    """

    def get_users(self, email):
        users = get_user_model()._default_manager.filter(email__iexact=email, is_active=True)
        return (u for u in users if u.has_usable_password() or is_invited(u))


class MoveForm(forms.Form):
    """The admin's intermediate page for moving VMs to another host."""

    host = forms.ModelChoiceField(
        queryset=None,
        empty_label=None,
        help_text="Running VMs move live (a pause of a fraction of a second), stopped ones "
        "with their snapshots. Each VM's SSH port changes.",
    )

    def __init__(self, *args, **kwargs):
        from labs.compute.placement import UP
        from labs.models import Host

        super().__init__(*args, **kwargs)
        self.fields["host"].queryset = Host.objects.filter(UP).order_by("name")


class RejectForm(forms.Form):
    """The admin's intermediate page for rejecting groups in bulk."""

    note = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 60}),
        max_length=5000,
        help_text="Every member of the selected groups receives this note by email.",
    )


class BulkActionForm(forms.Form):
    """The course overview's bulk action: one operation on the VMs of all or some groups.

    ``groups`` are the course's approved groups (the only choices accepted); the actions
    are the catalogue's bulk kinds, and one that destroys data needs the confirmation.
    """

    SCOPES = [("selected", "The groups selected below"), ("all", "All approved groups")]

    kind = forms.ChoiceField(
        label="Action",
        choices=lambda: [(k.kind, k.label) for k in kinds.bulk_kinds()],
        error_messages={"required": "Choose an action."},
    )
    scope = forms.ChoiceField(choices=SCOPES, initial="selected")
    groups = forms.TypedMultipleChoiceField(coerce=int, required=False)
    # Named for the one bulk kind that destroys data today; it confirms any such kind.
    confirm_reset = forms.BooleanField(
        required=False,
        label="I understand: reset erases the disks and snapshots of these VMs.",
    )

    def __init__(self, *args, groups=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["groups"].choices = [(g.pk, g.name) for g in groups]

    def clean(self):
        data = super().clean()
        entry = kinds.kind_of(data.get("kind") or "")
        if entry is not None and entry.destroys and not data.get("confirm_reset"):
            self.add_error(
                "confirm_reset",
                f"{entry.label} erases the VMs' disks: tick the box to confirm it.",
            )
        if data.get("scope") == "selected" and "groups" in data and not data["groups"]:
            self.add_error("groups", "Select at least one group, or choose all approved groups.")
        return data

    @property
    def group_ids(self) -> list[int] | None:
        """The groups to act on (None: all approved); after validation."""
        if self.cleaned_data["scope"] == "all":
            return None
        return self.cleaned_data["groups"]

    @property
    def selected(self) -> set[int]:
        """The ticked groups as sent, to tick them again on a refused form."""
        raw = self.data.getlist("groups") if hasattr(self.data, "getlist") else []
        return {int(v) for v in raw if str(v).isdigit()}


class RolloverForm(forms.Form):
    """The admin's intermediate page for rolling a course over to a new term."""

    new_slug = forms.SlugField(max_length=50, help_text="The new course's slug (os101-s27).")
    term = forms.CharField(max_length=50, help_text="The new term (Spring 2027).")
