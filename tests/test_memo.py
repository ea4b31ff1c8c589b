"""``{% memo %}`` (labs/templatetags/memo.py) on the overview's rows: a row whose inputs did
not change comes from the memo, a changed one is rendered again, and the page reads the
same either way."""

import pytest

from labs.choices import ObservedState
from labs.live import regions
from labs.models import Vm
from labs.templatetags import memo


@pytest.mark.django_db
def test_the_overview_renders_again_only_the_rows_that_changed(group_a, group_b, make_vm):
    vm_a = make_vm(group_a, name="vm1", ssh_port=22000)
    make_vm(group_b, name="vm1", ssh_port=22001)
    memo.forget()  # another test's rows may have had these very values
    first = regions.course_regions(course=group_a.course)["groups"]
    before = memo.STATS.copy()

    again = regions.course_regions(course=group_a.course)["groups"]
    assert again == first
    assert memo.STATS - before == {"hit": 2}  # both groups' rows

    Vm.objects.filter(pk=vm_a.pk).update(observed_state=ObservedState.SHUTOFF)
    before = memo.STATS.copy()
    changed = regions.course_regions(course=group_a.course)["groups"]
    assert memo.STATS - before == {"hit": 1, "miss": 1}  # Alpha's row alone
    alpha = changed[changed.index(f'id="group-{group_a.pk}"') :].split("</tr>")[0]
    assert "state-shutoff" in alpha and "state-running" not in alpha
    bravo = changed[changed.index(f'id="group-{group_b.pk}"') :].split("</tr>")[0]
    assert "state-running" in bravo
