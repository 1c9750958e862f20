"""Topic and Filter value objects, routing, and the broker ACL as data."""

from __future__ import annotations

import pytest
from edgefleet.protocol import topics
from edgefleet.protocol.topics import AclRule, Filter, Route, Topic, acl, allowed, route
from hypothesis import given
from hypothesis import strategies as st

# -- Topic and Filter validation ---------------------------------------------------------------

VALID_TOPICS = [
    "a",
    "a/b",
    "/",
    "a//b",
    "/finance",
    "$SYS/broker",
    "ef/v1/dev/dev-a/release",
    "ü/€",
    " ",
    "x" * 65_535,
]
BAD_TOPICS = [
    ("", ValueError, "non-empty"),
    ("a/+/b", ValueError, "wildcards"),
    ("a/#", ValueError, "wildcards"),
    ("a+b", ValueError, "wildcards"),
    ("nul\0here", ValueError, "NUL"),
    ("\ud800", ValueError, "UTF-8"),
    ("x" * 65_536, ValueError, "65535"),
    ("€" * 21_846, ValueError, "65535"),  # 65,538 bytes in UTF-8
    (b"a/b", TypeError, "str"),
]


@pytest.mark.parametrize("value", VALID_TOPICS)
def test_valid_topics(value: str) -> None:
    assert Topic(value=value).value == value
    assert str(Topic(value=value)) == value


@pytest.mark.parametrize(("value", "error", "match"), BAD_TOPICS)
def test_bad_topics(value: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Topic(value=value)


VALID_FILTERS = [
    ("#", None, "#"),
    ("+", None, "+"),
    ("a/+/c", None, "a/+/c"),
    ("+/+", None, "+/+"),
    ("a/#", None, "a/#"),
    ("/+", None, "/+"),
    ("a/b", None, "a/b"),
    ("$share/g/a/+", "g", "a/+"),
    ("$share/coord/#", "coord", "#"),
    ("$share/g/$SYS/x", "g", "$SYS/x"),
    ("$SYS/#", None, "$SYS/#"),
    ("$shared/a", None, "$shared/a"),  # not the share prefix
]
BAD_FILTERS = [
    ("", ValueError, "non-empty"),
    ("a/#/b", ValueError, "last level"),
    ("a#", ValueError, "last level"),
    ("#/", ValueError, "last level"),
    ("a/b+", ValueError, r"\+ must be a whole level"),
    ("+a/b", ValueError, r"\+ must be a whole level"),
    ("$share/", ValueError, "group"),
    ("$share/g", ValueError, "group"),
    ("$share//a", ValueError, "group"),
    ("$share/g+/a", ValueError, "group"),
    ("$share/g#/a", ValueError, "group"),
    ("$share/g/", ValueError, "empty filter"),
    ("$share/g/a/#/b", ValueError, "last level"),
    ("nul\0", ValueError, "NUL"),
    ("\udfff/#", ValueError, "UTF-8"),
    ("#" + "/a" * 40_000, ValueError, "65535"),
    (None, TypeError, "str"),
]


@pytest.mark.parametrize(("value", "group", "inner"), VALID_FILTERS)
def test_valid_filters(value: str, group: str | None, inner: str) -> None:
    f = Filter(value=value)
    assert (f.value, f.group, f.filter, str(f)) == (value, group, inner, value)


@pytest.mark.parametrize(("value", "error", "match"), BAD_FILTERS)
def test_bad_filters(value: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Filter(value=value)


def test_value_objects_are_frozen_and_compare_by_value() -> None:
    assert Topic(value="a/b") == Topic(value="a/b")
    assert Filter(value="a/+") == Filter(value="a/+")
    with pytest.raises(AttributeError):
        Topic(value="a").value = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Topic("a")  # type: ignore[misc]  # keyword-only


# -- matching ----------------------------------------------------------------------------------

MATCHES = [
    ("#", "a", True),
    ("#", "a/b/c", True),
    ("#", "/", True),
    ("a/#", "a", True),  # # also matches the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("a/#", "b/a", False),
    ("+", "a", True),
    ("+", "a/b", False),
    ("+", "/", False),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("a/+", "a/", True),  # an empty level is a level
    ("a/+", "a", False),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/b/d", False),
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a/b", "A/b", False),
    ("+/+/#", "a/b", True),
    # $-topics: no leading wildcard matches them
    ("#", "$SYS/broker", False),
    ("+/broker", "$SYS/broker", False),
    ("+", "$x", False),
    ("$SYS/#", "$SYS/broker", True),
    ("$SYS/+", "$SYS/broker", True),
    ("a/#", "a/$x", True),  # only the first level is special
    # shared filters match on their filter part
    ("$share/g/#", "a/b", True),
    ("$share/g/#", "$SYS/x", False),
    ("$share/g/ef/v1/dev/+/up/chunkreq", "ef/v1/dev/d1/up/chunkreq", True),
    ("$share/g/ef/v1/dev/+/up/chunkreq", "ef/v1/dev/d1/up/status", False),
    ("$share/g/a", "$share/g/a", False),
]


@pytest.mark.parametrize(("filt", "topic", "expected"), MATCHES)
def test_matches(filt: str, topic: str, expected: bool) -> None:
    assert Filter(value=filt).matches(topic) is expected
    assert Filter(value=filt).matches(Topic(value=topic)) is expected


def test_matches_rejects_a_filter_as_topic() -> None:
    with pytest.raises(ValueError, match="wildcards"):
        Filter(value="#").matches("a/+")


_level = st.text(
    st.characters(blacklist_characters="/+#\0", blacklist_categories=("Cs",)), max_size=5
)
_topics = st.lists(_level, min_size=1, max_size=6).map("/".join).filter(bool)


@given(_topics, st.data())
def test_property_wildcards_generalise_a_topic(name: str, data: st.DataObject) -> None:
    """A topic matches itself; any level replaced by +, or any tail by #, still matches."""
    levels = name.split("/")
    assert Filter(value=name).matches(name)
    i = data.draw(st.integers(0, len(levels) - 1))
    plus = "/".join([*levels[:i], "+", *levels[i + 1 :]])
    hash_ = "/".join([*levels[:i], "#"])
    dollar = name.startswith("$") and i == 0
    assert Filter(value=plus).matches(name) is not dollar
    assert Filter(value=hash_).matches(name) is not dollar
    assert Filter(value=f"$share/g/{plus}").matches(name) is not dollar
    assert not Filter(value=name + "/x").matches(name)


# -- EdgeFleet topics and routing --------------------------------------------------------------


def test_string_helpers_keep_their_results() -> None:
    assert topics.release("dev-a") == "ef/v1/dev/dev-a/release"
    assert topics.chunk("dev-a") == "ef/v1/dev/dev-a/chunk"
    assert topics.cmd("dev-a") == "ef/v1/dev/dev-a/cmd"
    assert topics.up("dev-a", "status") == "ef/v1/dev/dev-a/up/status"
    assert topics.up_all("chunkreq") == "ef/v1/dev/+/up/chunkreq"
    assert topics.fl("dev-a") == "ef/v1/dev/dev-a/fl"
    assert topics.up("dev-a", "fl") == "ef/v1/dev/dev-a/up/fl"
    assert topics.up_all("fl") == "ef/v1/dev/+/up/fl"
    assert topics.device_client_id("dev-a") == "agent-dev-a"
    assert topics.chunk_requests_shared() == "$share/edgefleet-coord/ef/v1/dev/+/up/chunkreq"
    assert topics.device_of("ef/v1/dev/dev-a/up/status") == ("dev-a", "up/status")
    assert topics.device_of("ef/v1/dev/bad id/release") is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: topics.release("bad/id"), "device id"),
        (lambda: topics.release(""), "device id"),
        (lambda: topics.chunk("+"), "device id"),
        (lambda: topics.up("dev-a", "release"), "upstream kind"),
        (lambda: topics.up_all("nope"), "upstream kind"),
        (lambda: topics.device_topic("dev-a", "up"), "topic kind"),
        (lambda: topics.fl("a/b"), "device id"),
        (lambda: topics.device_client_id("+"), "device id"),
    ],
)
def test_helpers_reject_bad_arguments(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


@pytest.mark.parametrize("kind", topics.KINDS)
def test_route_every_kind(kind: str) -> None:
    name = topics.device_topic("dev-7", kind).value
    assert route(name) == Route(device_id="dev-7", kind=kind)


def test_fl_kinds_are_routed() -> None:
    assert {"fl", "up/fl"} <= set(topics.KINDS)
    assert route(topics.fl("d")) == Route(device_id="d", kind="fl")
    assert route(topics.up("d", "fl")) == Route(device_id="d", kind="up/fl")


def test_route_of_the_helpers() -> None:
    assert route(topics.release("d")) == Route(device_id="d", kind="release")
    assert route(topics.up("d", "chunkreq")) == Route(device_id="d", kind="up/chunkreq")


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "ef/v1/dev/d",
        "ef/v1/dev/d/",
        "ef/v1/dev/d/up",
        "ef/v1/dev/d/up/other",
        "ef/v1/dev/d/release/x",
        "ef/v1/dev/d/cmd/sub",
        "ef/v1/dev/d/fl/x",
        "ef/v1/dev/d/up/fl/x",
        "ef/v1/dev/-bad/release",
        "ef/v2/dev/d/release",
        "xx/v1/dev/d/release",
        "ef/v1/devs/d/release",
        "ef/v1/dev/+/release",
        "$share/edgefleet-coord/ef/v1/dev/d/up/chunkreq",
    ],
)
def test_route_junk(junk: str) -> None:
    assert route(junk) is None


def test_route_validates() -> None:
    with pytest.raises(ValueError):
        Route(device_id="d", kind="telemetry")


# -- the ACL -----------------------------------------------------------------------------------

RULES = acl("coord")
A, B = "dev-a", "dev-b"
ACL_TABLE = [
    # (user, access, topic, allowed)
    (A, "read", topics.release(A), True),
    (A, "read", topics.chunk(A), True),
    (A, "read", topics.cmd(A), True),
    (A, "read", topics.cmd(A) + "/reboot", True),
    (A, "read", topics.release(B), False),
    (A, "read", topics.chunk(B), False),
    (A, "read", topics.up(A, "status"), False),  # not even its own upstream
    (A, "read", topics.up(B, "chunkreq"), False),
    (A, "write", topics.release(A), False),
    (A, "write", topics.chunk(A), False),
    (A, "write", topics.cmd(A), False),
    (A, "write", topics.up(A, "status"), True),
    (A, "write", topics.up(A, "chunkreq"), True),
    (A, "write", topics.up(A, "telemetry"), True),
    (A, "write", topics.up(A, "fl"), True),
    (A, "read", topics.fl(A), True),
    (A, "read", topics.fl(B), False),
    (A, "read", topics.up(A, "fl"), False),
    (A, "write", topics.fl(A), False),  # only the coordinator sends FL messages
    (A, "write", topics.up(B, "fl"), False),
    (A, "write", "ef/v1/dev/dev-a/up/anything-else", False),  # exact upstream topics only
    (A, "write", "ef/v1/dev/dev-a/up/status/x", False),
    (A, "write", "ef/v1/dev/dev-a/up", False),
    ("coord", "write", topics.fl(A), True),
    ("coord", "read", topics.up(A, "fl"), True),
    (A, "write", topics.up(B, "status"), False),
    (A, "write", topics.up(B, "telemetry"), False),
    (A, "write", "ef/v1/coordinator/x", False),
    (A, "read", "$SYS/broker/uptime", False),
    (None, "read", topics.release(A), False),  # anonymous: %u never applies
    (None, "write", topics.up(A, "status"), False),
    ("coord", "write", topics.release(A), True),
    ("coord", "write", topics.chunk(B), True),
    ("coord", "read", topics.up(B, "chunkreq"), True),
    ("coord", "read", "ef/v1/anything/else", True),
    ("coord", "write", "other/tree", False),
    ("coord", "read", "$SYS/broker/uptime", False),
    ("coordinator", "write", topics.release(A), False),  # only the named coordinator
]


@pytest.mark.parametrize(("user", "access", "topic", "expected"), ACL_TABLE)
def test_acl_evaluation(user: str | None, access: str, topic: str, expected: bool) -> None:
    assert allowed(RULES, user, access, topic) is expected  # type: ignore[arg-type]


def test_acl_rules_are_todays_rules() -> None:
    assert [(r.user, r.access, r.filter) for r in acl("coord-1")] == [
        (None, "read", "ef/v1/dev/%u/release"),
        (None, "read", "ef/v1/dev/%u/chunk"),
        (None, "read", "ef/v1/dev/%u/cmd"),
        (None, "read", "ef/v1/dev/%u/cmd/#"),
        (None, "read", "ef/v1/dev/%u/fl"),
        (None, "write", "ef/v1/dev/%u/up/status"),
        (None, "write", "ef/v1/dev/%u/up/chunkreq"),
        (None, "write", "ef/v1/dev/%u/up/telemetry"),
        (None, "write", "ef/v1/dev/%u/up/fl"),
        ("coord-1", "readwrite", "ef/v1/#"),
    ]


SUBSCRIBE_TABLE = [
    # (user, filter, granted) -- dynamic-security semantics of the generated broker config
    (A, topics.release(A), True),
    (A, topics.chunk(A), True),
    (A, topics.cmd(A), True),
    (A, topics.cmd(A) + "/#", True),
    (A, topics.cmd(A) + "/+", True),
    (A, topics.fl(A), True),
    (A, topics.release(B), False),
    (A, "ef/v1/dev/+/release", False),  # a wildcard level is not covered by a literal one
    (A, "ef/v1/dev/#", False),
    (A, "#", False),
    (A, topics.up(A, "status"), False),  # it writes there, it does not read
    (A, topics.chunk_requests_shared(), False),  # item 2: never the coordinators' group
    (A, "$share/edgefleet-coord/" + topics.chunk(A), False),
    (A, "$share/other/" + topics.chunk(A), False),
    (None, topics.release(A), False),
    ("a+b", topics.release("a+b".replace("+", "")), False),
    ("coord", topics.chunk_requests_shared(), True),
    ("coord", topics.up_all("status"), True),
    ("coord", "ef/v1/#", True),
    ("coord", "$share/other-group/ef/v1/dev/+/up/chunkreq", False),
    ("coord", "#", False),
    ("coord", "$SYS/#", False),
]


@pytest.mark.parametrize(("user", "wanted", "expected"), SUBSCRIBE_TABLE)
def test_may_subscribe(user: str | None, wanted: str, expected: bool) -> None:
    assert topics.may_subscribe(RULES, user, wanted) is expected


def test_no_rules_allow_nothing_and_readwrite_grants_both() -> None:
    assert not allowed([], "u", "read", "a")
    rw = [AclRule(user="u", access="readwrite", filter="a/#")]
    assert allowed(rw, "u", "read", "a/b") and allowed(rw, "u", "write", "a/b")
    only_read = [AclRule(user="u", access="read", filter="a/#")]
    assert not allowed(only_read, "u", "write", "a/b")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"user": "", "access": "read", "filter": "a"}, "username"),
        ({"user": "two words", "access": "read", "filter": "a"}, "username"),
        ({"user": "a/b", "access": "read", "filter": "a"}, "username"),
        ({"user": "u", "access": "read", "filter": "a/%u"}, "pattern"),
        ({"user": None, "access": "deny", "filter": "a"}, "access"),
        ({"user": None, "access": "read", "filter": "a/#/b"}, "last level"),
        ({"user": None, "access": "read", "filter": "a\nuser x"}, "newline"),
        ({"user": None, "access": "read", "filter": "$share/g/a"}, r"\$share"),
        ({"user": None, "access": "read", "filter": ""}, "non-empty"),
    ],
)
def test_bad_acl_rules(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AclRule(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "two words", "x\ntopic readwrite #", "a/b", "#", "+"])
def test_acl_rejects_bad_coordinator_names(name: str) -> None:
    with pytest.raises(ValueError, match="username"):
        acl(name)


@pytest.mark.parametrize("user", ["a+b", "a#", "+"])
def test_dangerous_usernames_are_denied_everything(user: str) -> None:
    everything = [AclRule(user=None, access="readwrite", filter="#")]
    assert allowed(everything, "ab", "write", "x")
    assert not allowed(everything, user, "write", "x")
    assert not allowed(everything, user, "read", "x")


def test_allowed_rejects_bad_access() -> None:
    with pytest.raises(ValueError, match="access"):
        allowed(RULES, "u", "readwrite", "a")  # type: ignore[arg-type]
