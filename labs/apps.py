from django.apps import AppConfig


class LabsConfig(AppConfig):
    name = "labs"
    verbose_name = "Labs"

    def ready(self) -> None:
        # Access ends wherever it ends: the signals that close sockets. Live pages: what
        # changed is rendered once per audience and pushed (labs.live.regions), and kept for
        # page fetches until something changes (labs.live.pagecache).
        from labs.live import events, pagecache, regions
        from labs.people import revocation  # noqa: F401

        events.regions_renderer(regions.render)
        pagecache.connect()  # rendered page parts follow the models they show
