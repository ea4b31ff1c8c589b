from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "Stratus administration"
admin.site.site_title = "Stratus admin"
admin.site.index_title = "Courses, groups and reviews"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("labs.urls")),
]
