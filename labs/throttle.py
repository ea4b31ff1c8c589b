"""Counters that slow down what one account or one address may ask for (console tickets,
password-reset mails): a fixed window per key in Redis, INCR + EXPIRE in one round trip.

Sign-ins are django-axes' (settings.AXES_*): a library made for it, with its lock-outs
visible in the admin.
"""

import redis
from django.conf import settings

from labs.errors import Refused, Unavailable

PREFIX = "stratus:throttle:"


class Throttled(Refused):
    http_status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def throttle_hit(
    *, scope: str, keys: list[str], limit: int, window: int, what: str, unavailable: str = ""
) -> None:
    """Count one request against every key (an account, an address); Throttled naming when
    to come back once any key is over ``limit`` in its ``window`` seconds; Unavailable
    (``unavailable`` or a sentence about ``what``) when Redis does not answer."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        pipe = client.pipeline()
        for key in keys:
            name = f"{PREFIX}{scope}:{key}"
            pipe.incr(name)
            pipe.expire(name, window, nx=True)
            pipe.ttl(name)
        replies = pipe.execute()
    except redis.RedisError as error:
        raise Unavailable(
            unavailable or f"{what.capitalize()} cannot be asked for right now; try again soon."
        ) from error
    finally:
        client.close()
    for count, _, ttl in zip(replies[0::3], replies[1::3], replies[2::3], strict=True):
        if count > limit:
            wait = max(int(ttl), 1)
            raise Throttled(f"Too many requests for {what}; try again in {wait} s.", wait)


def client_address(request) -> str:
    return request.META.get("REMOTE_ADDR", "") or "unknown"
