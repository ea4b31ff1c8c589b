from django.urls import path

from labs import reports, views, views_firewall, views_ports, views_volumes

app_name = "labs"

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("courses/<slug:slug>/signup/", views.group_signup, name="group_signup"),
    path("courses/<slug:slug>/overview/", views.course_overview, name="course_overview"),
    path("courses/<slug:slug>/bulk/", views.course_bulk, name="course_bulk"),
    path("courses/<slug:slug>/usage.csv", reports.course_usage_csv, name="course_usage_csv"),
    path("groups/<int:group_id>/", views.group_detail, name="group_detail"),
    path("groups/<int:group_id>/edit/", views.group_edit, name="group_edit"),
    path("groups/<int:group_id>/key/", views.group_key, name="group_key"),
    path("groups/<int:group_id>/confirm/", views.group_confirm, name="group_confirm"),
    path("groups/<int:group_id>/decline/", views.group_decline, name="group_decline"),
    path("groups/<int:group_id>/vms/add/", views.vm_add, name="vm_add"),
    path("vms/<int:vm_id>/console/", views.vm_console, name="vm_console"),
    path("vms/<int:vm_id>/console/ticket", views.vm_console_ticket, name="vm_console_ticket"),
    path("vms/<int:vm_id>/keep-running/", views.vm_keep_running, name="vm_keep_running"),
    path("vms/<int:vm_id>/volumes/add/", views_volumes.vm_volume_add, name="vm_volume_add"),
    path(
        "vms/<int:vm_id>/volumes/attach/", views_volumes.vm_volume_attach, name="vm_volume_attach"
    ),
    path("volumes/<int:volume_id>/detach/", views_volumes.volume_detach, name="volume_detach"),
    path("volumes/<int:volume_id>/delete/", views_volumes.volume_delete, name="volume_delete"),
    path("vms/<int:vm_id>/ports/publish/", views_ports.vm_port_publish, name="vm_port_publish"),
    path(
        "ports/<int:publication_id>/unpublish/",
        views_ports.port_unpublish,
        name="port_unpublish",
    ),
    path(
        "groups/<int:group_id>/firewall/add/",
        views_firewall.firewall_rule_add,
        name="firewall_rule_add",
    ),
    path(
        "firewall/<int:rule_id>/remove/",
        views_firewall.firewall_rule_remove,
        name="firewall_rule_remove",
    ),
    path(
        "firewall/<int:rule_id>/lock/",
        views_firewall.firewall_rule_lock,
        name="firewall_rule_lock",
    ),
    path("vms/<int:vm_id>/<slug:kind>/", views.vm_operation, name="vm_operation"),
]
