from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.mail.backends.base import BaseEmailBackend
from django.db import connection

from labs.choices import Role
from labs.models import Membership
from labs.people.roster import roster_import

User = get_user_model()

HEADER = "username,email,first_name,last_name,role"
EXPECTED = "expected username, email[, first_name, last_name, role]"


def roster_csv(*lines: str, header: str = HEADER) -> bytes:
    """A roster file: the header, then the given lines (UTF-8, LF line ends)."""
    return "\n".join([header, *lines, ""]).encode()


def membership_of(username: str) -> Membership:
    return Membership.objects.select_related("user").get(user__username=username)


# Creating -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_users_and_their_course_memberships(import_roster, course):
    report = import_roster(
        roster_csv(
            "alice,alice@example.edu,Alice,Adams,student",
            "tom,tom@example.edu,Tom,Tran,ta",
            "ines,ines@example.edu,Ines,Ito,instructor",
        )
    )

    assert (report.created, report.updated, report.unchanged) == (3, 0, 0)
    assert report.invited == 3
    assert report.dry_run is False
    assert [(line.line, line.username, line.outcome) for line in report.lines] == [
        (2, "alice", "created"),
        (3, "tom", "created"),
        (4, "ines", "created"),
    ]
    alice = User.objects.get(username="alice")
    assert (alice.email, alice.first_name, alice.last_name) == (
        "alice@example.edu",
        "Alice",
        "Adams",
    )
    roles = dict(Membership.objects.filter(course=course).values_list("user__username", "role"))
    assert roles == {"alice": Role.STUDENT, "tom": Role.TA, "ines": Role.INSTRUCTOR}


@pytest.mark.django_db
def test_new_accounts_have_no_usable_password(import_roster):
    import_roster(roster_csv("alice,alice@example.edu,,,"))

    alice = User.objects.get(username="alice")
    assert not alice.has_usable_password()
    assert not alice.check_password("")


@pytest.mark.django_db
def test_tas_and_instructors_get_staff_access_but_never_superuser(import_roster):
    import_roster(
        roster_csv(
            "sam,sam@example.edu,,,student",
            "tom,tom@example.edu,,,ta",
            "ines,ines@example.edu,,,instructor",
        )
    )

    flags = dict(User.objects.values_list("username", "is_staff"))
    assert flags == {"sam": False, "tom": True, "ines": True}
    assert not User.objects.filter(is_superuser=True).exists()


@pytest.mark.django_db
def test_rows_without_a_role_get_the_default_role(import_roster):
    import_roster(
        roster_csv("tom,tom@example.edu", "ines,ines@example.edu,,,instructor"),
        default_role=Role.TA,
    )

    assert membership_of("tom").role == Role.TA
    assert membership_of("tom").user.is_staff
    assert membership_of("ines").role == Role.INSTRUCTOR


@pytest.mark.django_db
def test_the_role_column_is_optional_and_case_insensitive(import_roster):
    import_roster(roster_csv("alice,alice@example.edu", "tom,tom@example.edu,,,TA"))

    assert membership_of("alice").role == Role.STUDENT
    assert membership_of("tom").role == Role.TA


@pytest.mark.django_db
def test_column_names_ignore_case_order_and_surrounding_spaces(import_roster):
    import_roster(
        roster_csv(
            "Alice@Example.EDU , alice , Adams",
            header=" Email ,USERNAME,  Last Name ",
        )
    )

    alice = User.objects.get(username="alice")
    # Django normalises the domain of an address, not the mailbox.
    assert (alice.email, alice.last_name) == ("Alice@example.edu", "Adams")


@pytest.mark.django_db
def test_it_accepts_a_utf8_byte_order_mark(import_roster):
    data = b"\xef\xbb\xbf" + roster_csv("rene,rene@example.edu,Ren\u00e9,M\u00fcller,")

    report = import_roster(data)

    assert report.created == 1
    rene = User.objects.get(username="rene")
    assert (rene.first_name, rene.last_name) == ("Ren\u00e9", "M\u00fcller")


@pytest.mark.django_db
def test_blank_lines_and_empty_rows_are_skipped(import_roster):
    data = (
        b"\r\nusername,email\r\n\r\nalice,alice@example.edu\r\n   \r\n,\r\nbob,bob@example.edu\r\n"
    )

    report = import_roster(data)

    assert [(line.line, line.username) for line in report.lines] == [(4, "alice"), (7, "bob")]


@pytest.mark.django_db
def test_quoted_values_may_contain_commas(import_roster):
    import_roster(roster_csv('alice,alice@example.edu,"Alice, Jr.",Adams'))

    assert User.objects.get(username="alice").first_name == "Alice, Jr."


# Updating and idempotence -----------------------------------------------------------------


@pytest.mark.django_db
def test_running_the_same_file_again_changes_nothing_and_sends_no_mail(
    import_roster, django_capture_on_commit_callbacks
):
    data = roster_csv("alice,alice@example.edu,Alice,Adams,", "tom,tom@example.edu,Tom,,ta")
    with django_capture_on_commit_callbacks(execute=True):
        import_roster(data)
    mail.outbox.clear()
    before = list(User.objects.order_by("pk").values())

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        report = import_roster(data)

    assert (report.created, report.updated, report.unchanged) == (0, 0, 2)
    assert report.invited == 0
    assert callbacks == []
    assert mail.outbox == []
    assert list(User.objects.order_by("pk").values()) == before


@pytest.mark.django_db
def test_it_updates_the_email_and_names_of_existing_users(import_roster, alice):
    report = import_roster(roster_csv("alice,alice.adams@example.edu,Alicia,Adams,"))

    assert (report.created, report.updated, report.unchanged) == (0, 1, 0)
    assert report.lines[0].changes == ("email", "first_name", "last_name")
    alice.refresh_from_db()
    assert (alice.email, alice.first_name, alice.last_name) == (
        "alice.adams@example.edu",
        "Alicia",
        "Adams",
    )


@pytest.mark.django_db
def test_empty_name_cells_keep_the_names_a_user_already_has(import_roster, alice):
    report = import_roster(roster_csv("alice,alice@example.edu,,,"))

    assert report.unchanged == 1
    alice.refresh_from_db()
    assert alice.first_name == "Alice"


@pytest.mark.django_db
def test_it_changes_the_role_of_someone_already_on_the_roster(import_roster, dave):
    report = import_roster(roster_csv("dave,dave@example.edu,,,ta"))

    assert report.updated == 1
    assert report.lines[0].changes == ("staff access", "role: student → ta")
    assert membership_of("dave").role == Role.TA
    dave.refresh_from_db()
    assert dave.is_staff


@pytest.mark.django_db
def test_making_staff_a_student_again_leaves_their_staff_access(import_roster, ines):
    import_roster(roster_csv("ines,ines@example.edu,,,student"))

    assert membership_of("ines").role == Role.STUDENT
    ines.refresh_from_db()
    assert ines.is_staff
    assert not ines.is_superuser


@pytest.mark.django_db
def test_an_existing_user_new_to_the_course_is_added_and_counted_as_updated(
    import_roster, course, django_capture_on_commit_callbacks
):
    User.objects.create_user("olga", email="olga@example.edu", password=None)

    with django_capture_on_commit_callbacks(execute=True):
        report = import_roster(roster_csv("olga,olga@example.edu,,,"))

    assert (report.created, report.updated, report.unchanged) == (0, 1, 0)
    assert report.lines[0].changes == ("added to os101 as student",)
    assert Membership.objects.filter(course=course, user__username="olga").exists()
    assert mail.outbox == []  # not a new account: no invitation


@pytest.mark.django_db
def test_a_student_in_a_group_stays_a_student_when_the_file_says_so(import_roster, group_a):
    report = import_roster(roster_csv("bob,bob@example.edu,Bob,,student"))

    assert report.unchanged == 1
    assert membership_of("bob").group == group_a


@pytest.mark.django_db
def test_it_updates_a_user_whose_stored_email_differs_only_in_case(import_roster, alice):
    report = import_roster(roster_csv("alice,ALICE@example.edu,,,"))

    assert report.updated == 1
    alice.refresh_from_db()
    assert alice.email == "ALICE@example.edu"


@pytest.mark.django_db
def test_an_existing_non_ascii_username_is_found_again(import_roster):
    # SQLite's LOWER() leaves "Ä" alone; the exact name must still match.
    User.objects.create_user("Ärne", email="arne@example.edu", password=None)

    report = import_roster(roster_csv("Ärne,arne@example.edu,Ärne,,"), allow_account_changes=True)

    assert report.updated == 1
    assert User.objects.get().first_name == "Ärne"


@pytest.fixture
def five_rows_per_query(monkeypatch):
    """Make the database take 30 parameters per query: users are looked up 5 rows at a time."""
    monkeypatch.setattr(type(connection.features), "max_query_params", 30)


@pytest.mark.django_db
def test_it_works_when_the_rows_are_looked_up_in_slices(
    import_roster, five_rows_per_query, alice, bob, carol
):
    rows = [f"user{n},user{n}@example.edu" for n in range(12)]
    data = roster_csv(
        "alice,alice@example.edu,,,", *rows, "bob,bob@example.edu,,,", "carol,x@example.edu"
    )

    report = import_roster(data)

    assert (report.created, report.updated, report.unchanged) == (12, 1, 2)
    assert User.objects.count() == 15


@pytest.mark.django_db
def test_an_email_taken_by_a_user_from_another_slice_is_still_an_error(
    roster_errors, five_rows_per_query, alice
):
    rows = [f"user{n},user{n}@example.edu" for n in range(12)]
    errors = roster_errors(
        roster_csv("alice,alice.new@example.edu", *rows, "zed,alice@example.edu")
    )

    assert errors == [
        "line 15: email 'alice@example.edu' is already used by existing user 'alice'"
    ]


# Errors: the header and the encoding -------------------------------------------------------


@pytest.mark.django_db
def test_an_unknown_column_is_named_with_the_expected_columns(roster_error):
    error = roster_error(roster_csv("alice,alice@example.edu", header="username,emial,email"))

    assert error == f"line 1: unknown column 'emial'; {EXPECTED}"


@pytest.mark.django_db
def test_a_missing_required_column_is_named(roster_error):
    error = roster_error(roster_csv("alice,Alice", header="username,first_name"))

    assert error == f"line 1: missing column 'email'; {EXPECTED}"


@pytest.mark.django_db
def test_a_column_given_twice_is_an_error(roster_error):
    error = roster_error(
        roster_csv("a,a@example.edu,b@example.edu", header="username,email,Email")
    )

    assert error.startswith("line 1: column 'email' appears twice")


@pytest.mark.django_db
def test_a_semicolon_separated_file_gets_a_hint(roster_errors):
    errors = roster_errors(b"username;email\nalice;alice@example.edu\n")

    assert errors[0].startswith("line 1: unknown column 'username;email'")
    assert "commas, not semicolons" in errors[0]


@pytest.mark.django_db
def test_an_empty_file_is_an_error(roster_error):
    assert roster_error(b"\n\n").startswith("line 1: the file is empty")


@pytest.mark.django_db
def test_bytes_that_are_not_utf8_are_reported_with_line_and_column(roster_errors):
    lines = [f"user{n},user{n}@example.edu" for n in range(2, 7)]
    latin1 = b"rene,rene.r\xe9mi@example.edu"  # é saved as Latin-1, the 12th character
    data = roster_csv(*lines) + latin1 + b"\nmarc,marc@example.edu,Marc,Lef\xe8vre\n"

    errors = roster_errors(data)

    assert errors == [
        "line 7: not valid UTF-8 (byte 0xe9 at column 12) — save the file as UTF-8",
        "line 8: not valid UTF-8 (byte 0xe8 at column 31) — save the file as UTF-8",
    ]
    assert not User.objects.exists()


@pytest.mark.django_db
def test_a_quote_that_is_never_closed_is_reported(roster_errors):
    errors = roster_errors(roster_csv("alice,alice@example.edu", 'bob,"bob@example.edu'))

    assert errors[-1].startswith("line 3: cannot read the CSV")


# Errors: one row ---------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("row", "phrase"),
    [
        (",nobody@example.edu", "username is missing"),
        ("bob smith,bob@example.edu", "username 'bob smith' is not valid"),
        ("bob/smith,bob@example.edu", "username 'bob/smith' is not valid"),
        ("b" * 151 + ",bob@example.edu", "is 151 characters long; at most 150"),
        ("bob,", "email is missing"),
        ("bob,bob.example.edu", "email 'bob.example.edu' is not a valid email address"),
        ("bob,bob@localhost@x", "is not a valid email address"),
        ("bob," + "b" * 250 + "@example.edu", "characters long; at most 254"),
        ("bob,bob@example.edu," + "B" * 151, "first_name is 151 characters long; at most 150"),
        ("bob,bob@example.edu,Bob," + "B" * 151, "last_name is 151 characters long; at most 150"),
        ("bob,bob@example.edu,,,teacher", "role 'teacher' is not one of student, ta, instructor"),
        ("bob,bob@example.edu,Bob,Brown,student,extra", "6 values, but the header on line 1"),
    ],
)
def test_a_bad_row_is_reported_with_its_line(roster_error, row, phrase):
    error = roster_error(roster_csv("alice,alice@example.edu", row))

    assert error.startswith("line 3: ")
    assert phrase in error


@pytest.mark.django_db
def test_a_username_repeated_in_the_file_is_reported_ignoring_case(roster_error):
    before = [f"user{n},user{n}@example.edu" for n in (2, 3)]
    between = [f"user{n},user{n}@example.edu" for n in (5, 6, 7, 8)]
    error = roster_error(
        roster_csv(*before, "bob,bob@example.edu", *between, "Bob,robert@example.edu")
    )

    assert error == "line 9: username 'Bob' already on line 4"


@pytest.mark.django_db
def test_an_email_repeated_in_the_file_is_reported_ignoring_case(roster_error):
    error = roster_error(roster_csv("bob,bob@example.edu", "robert,BOB@example.edu"))

    assert error == "line 3: email 'BOB@example.edu' already on line 2"


@pytest.mark.django_db
def test_a_username_differing_only_in_case_from_an_existing_user_is_an_error(roster_error, alice):
    error = roster_error(
        roster_csv(
            "u2,u2@example.edu",
            "u3,u3@example.edu",
            "u4,u4@example.edu",
            "Alice,alice2@example.edu",
        )
    )

    assert error == (
        "line 5: 'Alice' clashes with existing user 'alice' (usernames are compared without case)"
    )


@pytest.mark.django_db
def test_an_email_of_another_existing_user_is_an_error_naming_them(roster_error, alice):
    error = roster_error(roster_csv("alicia,Alice@Example.edu"))

    assert error == "line 2: email 'Alice@example.edu' is already used by existing user 'alice'"


@pytest.mark.django_db
def test_a_student_in_a_group_cannot_become_course_staff(roster_error, group_a):
    error = roster_error(roster_csv("dave,dave@example.edu", "bob,bob@example.edu,,,ta"))

    assert error.startswith("line 3: 'bob' is in group 'Alpha'")
    assert membership_of("bob").role == Role.STUDENT
    assert not User.objects.filter(username="dave").exists()


@pytest.mark.django_db
def test_every_bad_line_is_reported_in_line_order(roster_errors, alice):
    errors = roster_errors(
        roster_csv(
            "good,good@example.edu",
            "ALICE,a2@example.edu",  # clashes with alice
            "bad name,bad@example.edu",
            "carl,carl@example.edu,,,boss",
            "good2,good2@example.edu",
            "Good,other@example.edu",
        )
    )

    assert [error.split(":")[0] for error in errors] == ["line 3", "line 4", "line 5", "line 7"]


@pytest.mark.django_db
def test_one_bad_row_after_many_good_ones_imports_nothing(roster_error, course):
    good = [f"student{n},student{n}@example.edu,First{n},Last{n}," for n in range(500)]

    error = roster_error(roster_csv(*good, "last one,last@example.edu"))

    assert error.startswith("line 502: username 'last one' is not valid")
    assert not User.objects.exists()
    assert not Membership.objects.exists()


@pytest.mark.django_db
def test_an_unknown_default_role_is_a_programming_error(course):
    with pytest.raises(ValueError, match="default_role"):
        roster_import(course=course, data=roster_csv("a,a@example.edu"), default_role="boss")


# Dry run -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_dry_run_reports_what_would_happen_and_writes_nothing(
    import_roster, dave, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        report = import_roster(
            roster_csv("dave,dave@example.edu,,,ta", "newbie,newbie@example.edu,New,Bie,"),
            dry_run=True,
        )

    assert report.dry_run is True
    assert (report.created, report.updated, report.unchanged) == (1, 1, 0)
    assert report.invited == 1
    assert not User.objects.filter(username="newbie").exists()
    assert membership_of("dave").role == Role.STUDENT
    dave.refresh_from_db()
    assert not dave.is_staff
    assert callbacks == []
    assert mail.outbox == []


@pytest.mark.django_db
def test_a_dry_run_of_a_bad_file_reports_the_errors(roster_error):
    error = roster_error(roster_csv("bad name,x@example.edu"), dry_run=True)

    assert error.startswith("line 2: username 'bad name' is not valid")


# Invitations -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_each_new_account_gets_one_invitation_after_commit(
    import_roster, alice, django_capture_on_commit_callbacks
):
    data = roster_csv(
        "alice,alice@example.edu,,,", "bob,bob@example.edu,Bob,,", "tom,tom@example.edu,,,ta"
    )
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        report = import_roster(data)
        assert mail.outbox == []  # nothing is sent before the transaction commits

    assert report.invited == 2
    for callback in callbacks:
        callback()
    assert sorted(message.to[0] for message in mail.outbox) == [
        "bob@example.edu",
        "tom@example.edu",
    ]
    assert mail.outbox[0].subject == "[os101] Your Stratus account"


@pytest.mark.django_db
def test_the_invitation_link_leads_to_the_set_password_form(
    import_roster, client, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        import_roster(roster_csv("bob,bob@example.edu,Bob,Brown,"))
    (message,) = mail.outbox
    links = [word for word in message.body.split() if "/accounts/reset/" in word]
    assert len(links) == 1, message.body
    assert "bob" in message.body  # the username they log in with

    response = client.get(urlsplit(links[0]).path, follow=True)

    assert response.status_code == 200
    assert response.context["validlink"] is True
    assert "new_password1" in response.context["form"].fields
    response = client.post(
        response.redirect_chain[-1][0],
        {
            "new_password1": "a quite long passphrase 7",
            "new_password2": "a quite long passphrase 7",
        },
    )
    assert response.status_code == 302
    assert client.login(username="bob", password="a quite long passphrase 7")


class BrokenMailServer(BaseEmailBackend):
    def send_messages(self, email_messages):
        raise ConnectionRefusedError(111, "Connection refused")


@pytest.mark.django_db
def test_a_mail_server_failure_keeps_the_accounts_and_is_reported(
    import_roster, settings, django_capture_on_commit_callbacks
):
    settings.MAILERS = {"default": {"BACKEND": f"{__name__}.BrokenMailServer"}}

    with django_capture_on_commit_callbacks(execute=True):
        report = import_roster(roster_csv("bob,bob@example.edu"))

    assert User.objects.filter(username="bob").exists()
    assert "Connection refused" in report.invitation_error


@pytest.mark.django_db
def test_no_password_is_ever_put_in_an_invitation(
    import_roster, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        import_roster(roster_csv("bob,bob@example.edu"))

    bob = User.objects.get(username="bob")
    (message,) = mail.outbox
    assert "password:" not in message.body.lower()
    assert bob.password not in message.body
    assert bob.password.split("!", 1)[-1] not in message.body


# Size ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_thousand_rows_import_in_a_handful_of_queries(
    import_roster, django_assert_max_num_queries, django_capture_on_commit_callbacks
):
    rows = [f"student{n:04},student{n:04}@example.edu,First{n},Last{n}," for n in range(1000)]
    data = roster_csv(*rows, "tom,tom@example.edu,Tom,Tran,ta")

    with django_assert_max_num_queries(8), django_capture_on_commit_callbacks(execute=True):
        report = import_roster(data)

    assert report.created == 1001
    assert Membership.objects.count() == 1001
    assert len(mail.outbox) == 1001

    with django_assert_max_num_queries(4):
        again = import_roster(data)
    assert again.unchanged == 1001


# --- a roster never takes over an account --------------------------------------------------


@pytest.mark.parametrize(
    "who",
    ["superuser", "staff of another course", "student of another course", "made by hand"],
)
def test_it_never_changes_the_email_or_names_of_an_account_it_does_not_own(
    course, roster_error, import_roster, who
):
    from labs.choices import Role
    from labs.models import Course, Membership

    other = Course.objects.create(slug="net201", title="Networks")
    user = User.objects.create_user(
        "eve", email="eve@example.edu", first_name="Eve", password=None,
        is_superuser=who == "superuser",
    )  # fmt: skip
    if who == "staff of another course":
        Membership.objects.create(course=other, user=user, role=Role.INSTRUCTOR)
    if who == "student of another course":
        Membership.objects.create(course=other, user=user, role=Role.STUDENT)

    error = roster_error(roster_csv("eve,attacker@example.com,Eve,,"))
    assert error.startswith("line 2: 'eve' is ")
    assert "does not change their email" in error and "--allow-account-changes" in error
    # Naming the account as it is, only adding it to the course, is fine.
    report = import_roster(roster_csv("eve,eve@example.edu,Eve,,"))
    assert report.updated == 1 and User.objects.get(username="eve").email == "eve@example.edu"


def test_the_operator_may_change_such_an_account_on_purpose(course, import_roster):
    User.objects.create_user("eve", email="eve@example.edu", password=None)
    report = import_roster(roster_csv("eve,eve@new.example.edu,,,"), allow_account_changes=True)
    assert report.updated == 1
    assert User.objects.get(username="eve").email == "eve@new.example.edu"


def test_accounts_this_course_made_are_still_updated(course, import_roster):
    import_roster(roster_csv("zoe,zoe@example.edu,Zoe,,"))
    report = import_roster(roster_csv("zoe,zoe@example.edu,Zoë,,"))
    assert report.updated == 1 and User.objects.get(username="zoe").first_name == "Zoë"
