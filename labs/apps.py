from django.apps import AppConfig


class LabsConfig(AppConfig):
    name = "labs"
    verbose_name = "Labs"

    def ready(self) -> None:
        # Access ends wherever it ends: the signals that close sockets.
        from labs.people import revocation  # noqa: F401
