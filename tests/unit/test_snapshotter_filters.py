"""containerd's filter syntax: every form containerd sends or accepts, and malformed filters refused
with a message that shows where."""

from __future__ import annotations

import pytest

from snapshotter.daemon.filters import FilterError, parse, parse_all, unquote

OBJ = {
    "name": "default/3/sha256:abc",
    "parent": "default/2/sha256:def",
    "kind": "committed",
    "labels": {
        "containerd.io/snapshot.ref": "sha256:abc",
        "l": "2",
        "very complex label": "something",
        "eq": "b=c",
        "ünï": "cödé",
    },
}


def adaptor(obj: dict):
    def field(path):
        if path[0] == "labels":
            labels = obj.get("labels") or {}
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        if path[0] in obj and len(path) == 1:
            return obj[path[0]], True
        return "", False

    return field


def matches(*filters: str, obj: dict = OBJ) -> bool:
    return parse_all(filters).match(adaptor(obj))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name==default/3/sha256:abc", True),
        ("name==other", False),
        ("name!=other", True),
        ("name!=default/3/sha256:abc", False),
        ("name~=^default/", True),
        ("name~=sha256:a", True),  # searched, not anchored
        ("name~=^sha256", False),
        ("labels.l", True),  # presence
        ("labels.missing", False),
        ("labels.l==2", True),
        ("labels.l==3", False),
        ("labels.missing!=x", True),  # != is true for an absent field
        ('labels."containerd.io/snapshot.ref"==sha256:abc', True),
        ('labels."very complex label"==something', True),
        ("labels.eq==b=c", True),  # '=' inside an unquoted value
        ('labels."ünï"==cödé', True),
        ('parent=="default/2/sha256:def"', True),
        ('parent!=""', True),
        ('parent==""', False),
        ("kind==committed", True),
        ("kind==active", False),
        ("name == default/3/sha256:abc", True),  # spaces around the operator
        ("kind==committed, labels.l==2", True),  # and after a comma
        ("kind==committed,labels.l==3", False),  # AND
        ("name~=/^default\\/3/", True),  # /-quoted regular expression, \/ escape
        ("name~=|abc$|", True),  # |-quoted
        ('labels.l=="\\x32"', True),  # hex escape
        ('labels.l=="\\062"', True),  # octal escape
        ('labels."\\u00fcn\\u00ef"=="c\\U000000f6d\\u00e9"', True),  # unicode escapes
        ("unknown", False),
        ("unknown!=x", True),
        ("labels", False),  # "labels" alone looks up the label with key "", as containerd's adaptor does
    ],
)
def test_match(text: str, expected: bool) -> None:
    assert matches(text) is expected


def test_containerd_remote_snapshot_filter_as_sent() -> None:
    # exactly what containerd 1.6 sends after a remote snapshotter's ALREADY_EXISTS (trace 3)
    f = 'labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/2/sha256:def"'
    assert matches(f)
    assert not matches(f, obj={**OBJ, "parent": ""})
    first_layer = 'labels."containerd.io/snapshot.ref"==sha256:abc,parent==""'
    assert matches(first_layer, obj={**OBJ, "parent": ""})


def test_several_filters_are_or_and_empty_matches_all() -> None:
    assert matches("name==x", "labels.l==2")
    assert not matches("name==x", "labels.l==3")
    assert parse_all([]).matches_all and matches()
    assert parse("") is None and parse_all(["name==x", ""]).matches_all


def test_no_labels_means_absent() -> None:
    bare = {"name": "n", "parent": "", "kind": "active", "labels": {}}
    assert not matches("labels.l", obj=bare)
    assert matches("labels.l!=2", obj=bare)


def test_equalities_for_index_lookups() -> None:
    f = parse('kind==view,labels."a.b"==1,name!=x,name==n')
    assert f is not None
    assert f.equalities() == [(("kind",), "view"), (("labels", "a.b"), "1"), (("name",), "n")]


def test_unquote() -> None:
    assert unquote('"a\\"b"') == 'a"b'
    assert unquote("/a\\/b/") == "a/b"
    assert unquote('"\\a\\b\\f\\n\\r\\t\\v\\\\"') == "\a\b\f\n\r\t\v\\"
    assert unquote('"\\101\\x42\\u0043"') == "ABC"
    with pytest.raises(FilterError):
        unquote('"\\/"')  # only the literal's own quote may be escaped
    with pytest.raises(FilterError):
        unquote('"\\777"')  # octal over 255


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name==", "expected a value"),
        ("==foo", "expected a field"),
        ("name=foo", "unsupported operator '='"),
        ("name===foo", "unsupported operator '==='"),
        ("name@=foo", "expected an operator"),
        ("name==foo bar", "unexpected input: ' '"),
        ("name==foo ,kind==view", "unexpected input: ' '"),
        ('labels."unterminated==x', "expected a field"),
        ('name=="\\q"', "expected a value"),
        ('name=="bad\nline"', "expected a value"),
        ("name~=(", "invalid regular expression"),
        (",name==a", "expected a field"),
        ("name==a,", "unexpected end of filter"),
        ("name..x", "expected a field"),
        ("name==.x", "expected a value"),
        ("name==a\0", "unexpected input"),
        ("labels.", "unexpected end of filter"),
    ],
)
def test_malformed(text: str, message: str) -> None:
    with pytest.raises(FilterError) as e:
        parse_all(["name==ok", text])
    assert message in str(e.value)
    assert repr(text) in str(e.value)  # the message shows the filter at fault


def test_error_points_at_the_position() -> None:
    with pytest.raises(FilterError) as e:
        parse("kind==view,name=x")
    assert "[kind==view,name >|=|< x]" in str(e.value)
