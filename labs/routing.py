from django.urls import path

from labs.consoles.channels import ConsoleConsumer
from labs.live.consumer import EventsConsumer

websocket_urlpatterns = [
    path("ws/vms/<int:vm_id>/console/", ConsoleConsumer.as_asgi()),
    path("ws/events/", EventsConsumer.as_asgi()),
]
