"""The public API: what ``import prefixshare`` offers, and the names that moved out of it still work, with a warning."""

import pytest

import prefixshare


def test_every_public_name_exists_and_is_documented():
    for name in prefixshare.__all__:
        value = getattr(prefixshare, name)
        assert (value.__doc__ or "").strip(), f"prefixshare.{name} has no docstring"


@pytest.mark.parametrize("name", sorted(prefixshare._MOVED))
def test_moved_names_still_resolve_with_a_deprecation_warning(name):
    import importlib

    with pytest.warns(DeprecationWarning, match=name):
        value = getattr(prefixshare, name)
    assert value is getattr(importlib.import_module(prefixshare._MOVED[name]), name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        prefixshare.not_a_name  # noqa: B018
