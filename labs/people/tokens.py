"""Links that set a password: invitations keep a week, ordinary resets a few hours.

One token generator for both (Django's own, whose tokens die as soon as the password or
the last login changes), with the lifetime chosen by whom the link is for: an *invited*
account — active, no usable password, never signed in — gets INVITATION_TIMEOUT_SECONDS
(PASSWORD_RESET_TIMEOUT, a week); every other account RESET_LINK_TIMEOUT_SECONDS (3 h).
"""

from django.conf import settings
from django.contrib.auth.tokens import PasswordResetTokenGenerator
from django.utils.http import base36_to_int


def is_invited(user) -> bool:
    """An account made by a roster import whose owner has not chosen a password yet."""
    return user.is_active and user.last_login is None and not user.has_usable_password()


class AccountTokenGenerator(PasswordResetTokenGenerator):
    def check_token(self, user, token) -> bool:
        if not super().check_token(user, token):  # at most PASSWORD_RESET_TIMEOUT old
            return False
        if is_invited(user):
            return True
        age = self._num_seconds(self._now()) - base36_to_int(token.split("-")[0])
        return age <= settings.RESET_LINK_TIMEOUT_SECONDS


account_tokens = AccountTokenGenerator()
