from django.urls import path

from labs.consumers import ConsoleConsumer, EventsConsumer

websocket_urlpatterns = [
    path("ws/vms/<int:vm_id>/console/", ConsoleConsumer.as_asgi()),
    path("ws/events/", EventsConsumer.as_asgi()),
]
