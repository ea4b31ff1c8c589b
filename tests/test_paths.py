import pytest
from django.template import Context, Template, TemplateSyntaxError
from django.urls import clear_script_prefix, reverse, set_script_prefix


def render(text: str, **context) -> str:
    return Template("{% load paths %}" + text).render(Context(context))


@pytest.mark.parametrize("name", ["labs:group_detail", "labs:vm_console", "labs:vm_add"])
@pytest.mark.parametrize("pk", [1, 7, 2147483647, 10**12])
def test_id_path_gives_what_reverse_gives(name, pk):
    assert render("{{ pk|id_path:name }}", pk=pk, name=name) == reverse(name, args=[pk])


def test_id_path_follows_the_script_prefix_of_a_site_under_a_sub_path():
    set_script_prefix("/lab/")
    try:
        assert render("{{ 5|id_path:'labs:group_detail' }}") == "/lab/groups/5/"
    finally:
        clear_script_prefix()
    assert render("{{ 5|id_path:'labs:group_detail' }}") == "/groups/5/"


def test_id_path_refuses_a_url_that_takes_no_id():
    with pytest.raises(TemplateSyntaxError, match="labs:home does not take one id"):
        render("{{ 5|id_path:'labs:home' }}")
