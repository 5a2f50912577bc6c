"""The pure RD registration table (translator/core/directory.py): events in, changes out."""

from __future__ import annotations

import pytest

from translator.core.directory import (
    DEFAULT_LIFETIME,
    Directory,
    DirectoryError,
    DirectoryRules,
    endpoints_link_format,
    parse_query,
    registration_link_format,
    resources_link_format,
)

RULES = DirectoryRules(allow_from=("10.0.0.0/8", "::1"), endpoints=("node-*",), max_registrations=3,
                       max_links=4, max_payload=200)
SOURCE = ("10.0.0.5", 5683)
LINKS = b'</temp>;rt="temperature";obs;ct=0,</hum>;rt="humidity"'


def table() -> Directory:
    return Directory(RULES)


def test_register_uses_the_source_address_as_base_and_resolves_links() -> None:
    rd = table()
    reg, change = rd.register({"ep": "node-1", "lt": "120"}, LINKS, SOURCE, now=1000.0)
    assert change.added == (reg,) and not change.removed and not change.changed
    assert reg.id == "rd/1" and reg.base == "coap://10.0.0.5:5683" and not reg.base_given
    assert [link.uri for link in reg.links] == ["coap://10.0.0.5:5683/temp", "coap://10.0.0.5:5683/hum"]
    assert reg.links[0].attr("rt") == "temperature" and reg.links[0].attr("obs") is True
    assert reg.expires == 1120.0


def test_lifetime_defaults_and_is_raised_to_the_minimum() -> None:
    rd = table()
    reg, _ = rd.register({"ep": "node-1"}, b"", SOURCE, now=0)
    assert reg.lt == DEFAULT_LIFETIME
    reg, _ = rd.register({"ep": "node-2", "lt": "1"}, b"", SOURCE, now=0)
    assert reg.lt == RULES.min_lifetime


def test_ipv6_source_base() -> None:
    reg, _ = table().register({"ep": "node-1"}, LINKS, ("::1", 40000), now=0)
    assert reg.base == "coap://[::1]:40000"
    assert reg.links[0].uri == "coap://[::1]:40000/temp"


def test_same_endpoint_again_replaces_at_the_same_location() -> None:
    rd = table()
    first, _ = rd.register({"ep": "node-1"}, LINKS, SOURCE, now=0)
    second, change = rd.register({"ep": "node-1"}, b"</temp>", ("10.0.0.6", 5683), now=5)
    assert second.id == first.id and len(rd) == 1
    assert change.changed == ((first, second),) and not change.added
    # Another sector is another endpoint.
    third, change = rd.register({"ep": "node-1", "d": "east"}, b"", SOURCE, now=5)
    assert third.id != first.id and change.added == (third,)


@pytest.mark.parametrize(
    ("query", "payload", "source", "code"),
    [
        ({"ep": "node-1"}, LINKS, ("192.168.1.2", 5683), "4.03"),  # not in allow_from
        ({"ep": "intruder"}, LINKS, SOURCE, "4.03"),  # endpoint pattern
        ({}, LINKS, SOURCE, "4.00"),  # no ep
        ({"ep": "node-" + "x" * 60}, LINKS, SOURCE, "4.00"),  # longer than 63 bytes
        ({"ep": "node-\n"}, LINKS, SOURCE, "4.00"),
        ({"ep": "node-1", "lt": "0"}, LINKS, SOURCE, "4.00"),
        ({"ep": "node-1", "lt": "abc"}, LINKS, SOURCE, "4.00"),
        ({"ep": "node-1", "lt": "4294967296"}, LINKS, SOURCE, "4.00"),
        ({"ep": "node-1", "base": "coap://[ff02::1]"}, LINKS, SOURCE, "4.03"),  # multicast
        ({"ep": "node-1", "base": "coap://224.0.1.187"}, LINKS, SOURCE, "4.03"),
        ({"ep": "node-1", "base": "coap://255.255.255.255"}, LINKS, SOURCE, "4.03"),
        ({"ep": "node-1", "base": "coap://0.0.0.0"}, LINKS, SOURCE, "4.03"),
        ({"ep": "node-1", "base": "coap://sensor.example"}, LINKS, SOURCE, "4.03"),
        ({"ep": "node-1", "base": "coap://10.0.0.9/path"}, LINKS, SOURCE, "4.00"),
        ({"ep": "node-1", "base": "http://10.0.0.9"}, LINKS, SOURCE, "4.00"),
        ({"ep": "node-1"}, b"</a>,</b>,</c>,</d>,</e>", SOURCE, "4.13"),  # max_links
        ({"ep": "node-1"}, b"</" + b"a" * 300 + b">", SOURCE, "4.13"),  # max_payload
        ({"ep": "node-1"}, b"<temp", SOURCE, "4.00"),  # not link-format
        ({"ep": "node-1"}, b"\xff", SOURCE, "4.00"),
        ({"ep": "node-1"}, b"<coap://10.9.9.9/x>", SOURCE, "4.03"),  # outside the base
        ({"ep": "node-1"}, b'</x>;anchor="coap://10.9.9.9"', SOURCE, "4.00"),
    ],
)
def test_bad_registrations_are_refused_with_their_code_and_change_nothing(
    query: dict[str, str], payload: bytes, source: tuple[str, int], code: str
) -> None:
    rd = table()
    kept, _ = rd.register({"ep": "node-0"}, LINKS, SOURCE, now=0)
    with pytest.raises(DirectoryError) as caught:
        rd.register(query, payload, source, now=1)
    assert caught.value.code == code, caught.value.message
    assert rd.registrations() == (kept,)


def test_wrong_content_format_is_4_15() -> None:
    with pytest.raises(DirectoryError) as caught:
        table().register({"ep": "node-1"}, b"{}", SOURCE, now=0, content_format=50)
    assert caught.value.code == "4.15"


def test_a_full_table_is_5_03_but_re_registration_still_works() -> None:
    rd = table()
    for n in range(3):
        rd.register({"ep": f"node-{n}"}, b"", SOURCE, now=0)
    with pytest.raises(DirectoryError) as caught:
        rd.register({"ep": "node-9"}, b"", SOURCE, now=0)
    assert caught.value.code == "5.03"
    _, change = rd.register({"ep": "node-1"}, LINKS, SOURCE, now=1)
    assert change.changed and len(rd) == 3


def test_update_renews_and_follows_a_moved_endpoint() -> None:
    rd = table()
    reg, _ = rd.register({"ep": "node-1", "lt": "100"}, LINKS, SOURCE, now=0)
    same, change = rd.update(reg.id, {}, SOURCE, now=50)
    assert not change and same.expires == 150
    moved, change = rd.update(reg.id, {"lt": "200"}, ("10.0.0.7", 6000), now=60)
    assert moved.base == "coap://10.0.0.7:6000" and moved.lt == 200
    assert moved.links[0].uri == "coap://10.0.0.7:6000/temp"
    assert change.changed == ((same, moved),)


def test_update_with_an_explicit_base_stays_there() -> None:
    rd = table()
    reg, _ = rd.register({"ep": "node-1", "base": "coap://10.0.0.9"}, LINKS, SOURCE, now=0)
    assert reg.base == "coap://10.0.0.9:5683" and reg.base_given
    again, change = rd.update(reg.id, {}, ("10.0.0.7", 6000), now=1)
    assert again.base == reg.base and not change


@pytest.mark.parametrize(
    ("query", "payload", "source", "code"),
    [
        ({}, b"", ("192.168.1.1", 5683), "4.03"),
        ({"lt": "x"}, b"", SOURCE, "4.00"),
        ({"ep": "other"}, b"", SOURCE, "4.00"),
        ({"base": "coap://[ff02::fd]"}, b"", SOURCE, "4.03"),
        ({}, b"</x>", SOURCE, "4.00"),
    ],
)
def test_bad_updates_change_nothing(
    query: dict[str, str], payload: bytes, source: tuple[str, int], code: str
) -> None:
    rd = table()
    reg, _ = rd.register({"ep": "node-1"}, LINKS, SOURCE, now=0)
    with pytest.raises(DirectoryError) as caught:
        rd.update(reg.id, query, source, now=1, payload=payload)
    assert caught.value.code == code
    assert rd.get(reg.id) == reg


def test_unknown_registration_is_4_04() -> None:
    rd = table()
    for call in (lambda: rd.update("rd/9", {}, SOURCE, now=0), lambda: rd.remove("rd/9", SOURCE)):
        with pytest.raises(DirectoryError) as caught:
            call()
        assert caught.value.code == "4.04"


def test_remove_and_expire_say_why() -> None:
    rd = table()
    a, _ = rd.register({"ep": "node-1", "lt": "100"}, LINKS, SOURCE, now=0)
    b, _ = rd.register({"ep": "node-2", "lt": "300"}, LINKS, SOURCE, now=0)
    with pytest.raises(DirectoryError):
        rd.remove(a.id, ("192.168.0.1", 1))
    assert rd.next_expiry() == 100
    assert not rd.expire(99.9)
    change = rd.expire(100)
    assert [reg for reg, _ in change.removed] == [a]
    assert "expired" in change.removed[0][1]
    change = rd.remove(b.id, SOURCE)
    assert change.removed == ((b, "the endpoint removed its registration"),)
    assert len(rd) == 0 and rd.next_expiry() is None


def test_lookups_filter_and_page() -> None:
    rd = table()
    rd.register({"ep": "node-1", "d": "east", "et": "oic.d.sensor"}, LINKS, SOURCE, now=0)
    rd.register({"ep": "node-2"}, b'</temp>;rt="temperature core.s"', ("::1", 7000), now=0)
    assert [r.ep for r in rd.lookup_endpoints({})] == ["node-1", "node-2"]
    assert [r.ep for r in rd.lookup_endpoints({"d": "east"})] == ["node-1"]
    assert [r.ep for r in rd.lookup_endpoints({"ep": "node-*"})] == ["node-1", "node-2"]
    assert [r.ep for r in rd.lookup_endpoints({"et": "oic.d.sensor"})] == ["node-1"]
    hits = rd.lookup_resources({"rt": "temperature"})
    assert [link.uri for _, link in hits] == ["coap://10.0.0.5:5683/temp", "coap://[::1]:7000/temp"]
    assert [link.uri for _, link in rd.lookup_resources({"rt": "core.s"})] == [
        "coap://[::1]:7000/temp"
    ]
    assert [link.uri for _, link in rd.lookup_resources({"ep": "node-1", "rt": "hum*"})] == [
        "coap://10.0.0.5:5683/hum"
    ]
    assert len(rd.lookup_resources({"obs": ""})) == 1
    assert [link.uri for _, link in rd.lookup_resources({"count": "1", "page": "2"})] == [
        "coap://[::1]:7000/temp"
    ]
    with pytest.raises(DirectoryError):
        rd.lookup_resources({"page": "1"})


def test_link_format_answers_parse_back() -> None:
    from translator.core.codecs import parse_link_format

    rd = table()
    reg, _ = rd.register({"ep": "node-1", "d": 'a"b'}, LINKS, SOURCE, now=0)
    [ep] = parse_link_format(endpoints_link_format(rd.lookup_endpoints({})))
    assert ep["href"] == "/rd/1" and ep["ep"] == "node-1" and ep["d"] == 'a"b'
    links = parse_link_format(resources_link_format(rd.lookup_resources({})))
    assert links[0]["href"] == "coap://10.0.0.5:5683/temp"
    assert links[0]["anchor"] == "coap://10.0.0.5:5683" and links[0]["obs"] is True
    assert parse_link_format(registration_link_format(reg))[1]["href"] == "/hum"


def test_parse_query() -> None:
    assert parse_query(["ep=a", "lt=5", "obs"]) == {"ep": "a", "lt": "5", "obs": ""}
    for bad in (["ep=a", "ep=b"], ["=x"]):
        with pytest.raises(DirectoryError):
            parse_query(bad)


def test_rules_refuse_bad_prefixes_and_unmapped_ipv4() -> None:
    with pytest.raises(ValueError):
        DirectoryRules(allow_from=("10.0.0.0/33",))
    rules = DirectoryRules(allow_from=("127.0.0.0/8",))
    assert rules.admits_source("::ffff:127.0.0.1") and not rules.admits_source("::1")
    assert not DirectoryRules().admits_source("127.0.0.1")
