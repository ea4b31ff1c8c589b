from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from labs.people.tokens import account_tokens
from labs.views import AccountResetView

admin.site.site_header = "Stratus administration"
admin.site.site_title = "Stratus admin"
admin.site.index_title = "Courses, groups and reviews"

urlpatterns = [
    path("admin/", admin.site.urls),
    # Invited accounts can ask for a new link; links live as long as whom they are for
    # needs (labs/people/tokens.py).
    path("accounts/password_reset/", AccountResetView.as_view(), name="password_reset"),
    path(
        "accounts/reset/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(token_generator=account_tokens),
        name="password_reset_confirm",
    ),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("labs.urls")),
]
