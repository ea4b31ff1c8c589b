from django import forms

from labs.models import Group

KEY_HELP = (
    "Paste one public key: the single line in your .pub file, for example "
    "~/.ssh/id_ed25519.pub. Create one with: ssh-keygen -t ed25519"
)


class GroupSignupForm(forms.Form):
    name = forms.CharField(label="Group name", max_length=Group._meta.get_field("name").max_length)
    members = forms.CharField(
        label="Other members",
        required=False,
        max_length=1000,
        help_text="Usernames of your teammates, separated by commas or spaces. "
        "You are a member already.",
    )
    project_title = forms.CharField(max_length=Group._meta.get_field("project_title").max_length)
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
    project_title = forms.CharField(max_length=Group._meta.get_field("project_title").max_length)
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


class RejectForm(forms.Form):
    """The admin's intermediate page for rejecting groups in bulk."""

    note = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 60}),
        max_length=5000,
        help_text="Every member of the selected groups receives this note by email.",
    )
