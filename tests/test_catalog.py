"""The catalogue of self-registered resources (translator/core/catalog.py) and the hub's
side of resources that come and go (withdraw, move, restore)."""

from __future__ import annotations

from translator.core.catalog import Catalog
from translator.core.directory import Directory, DirectoryRules, read_lookups
from translator.core.hub import Deliver, Hub, StartObservation, StopObservation

RULES = DirectoryRules(allow_from=("10.0.0.0/8",))
LINKS = b'</temp>;rt="temperature";obs;ct=60,</hum>'


def test_registration_names_and_template() -> None:
    rd, catalog = Directory(RULES), Catalog("{d}.{ep}.{path}")
    _, change = rd.register({"ep": "n1", "d": "lab"}, LINKS, ("10.0.0.1", 5683), now=0)
    result = catalog.apply(change)
    assert [e.name for e in result.added] == ["lab.n1.temp", "lab.n1.hum"]
    temp = result.added[0]
    assert (temp.rt, temp.cf, temp.observable, temp.ep) == ("temperature", 60, True, "n1")
    assert catalog.uri_for_name("lab.n1.temp") == "coap://10.0.0.1:5683/temp"


def test_taken_names_are_not_catalogued_twice() -> None:
    rd, catalog = Directory(RULES), Catalog(reserved={"n1/temp"})
    _, change = rd.register({"ep": "n1"}, LINKS, ("10.0.0.1", 5683), now=0)
    assert [e.name for e in catalog.apply(change).added] == ["n1/hum"]
    # Another sector, the same endpoint name: the names collide, the first keeps them.
    _, change = rd.register({"ep": "n1", "d": "x"}, LINKS, ("10.0.0.2", 5683), now=0)
    assert not catalog.apply(change).added and catalog.skipped == 3
    assert catalog.uri_for_name("n1/hum") == "coap://10.0.0.1:5683/hum"


def test_moves_and_returns() -> None:
    rd, catalog = Directory(RULES), Catalog()
    reg, change = rd.register({"ep": "n1"}, LINKS, ("10.0.0.1", 5683), now=0)
    catalog.apply(change)
    # An update from another address moves the entries (the base was the source).
    _, change = rd.update(reg.id, {}, ("10.0.0.2", 5683), now=1)
    result = catalog.apply(change)
    assert result.moves == (
        ("coap://10.0.0.1:5683/temp", "coap://10.0.0.2:5683/temp"),
        ("coap://10.0.0.1:5683/hum", "coap://10.0.0.2:5683/hum"),
    )
    assert result.changed[0][1].uri == "coap://10.0.0.2:5683/temp"
    result = catalog.apply(rd.remove(reg.id, ("10.0.0.2", 1)))
    assert len(result.removed) == 2 and len(catalog) == 0
    # Back at the same address: returns; then gone and back elsewhere: moves.
    _, change = rd.register({"ep": "n1"}, LINKS, ("10.0.0.2", 5683), now=2)
    result = catalog.apply(change)
    assert result.returns == ("coap://10.0.0.2:5683/temp", "coap://10.0.0.2:5683/hum")
    catalog.apply(rd.expire(now=10**9))
    _, change = rd.register({"ep": "n1"}, b"</temp>", ("10.0.0.3", 5683), now=10**9)
    assert catalog.apply(change).moves == (
        ("coap://10.0.0.2:5683/temp", "coap://10.0.0.3:5683/temp"),
    )


def test_read_lookups_applies_the_registration_rules() -> None:
    endpoints = (
        '</r/1>;ep="a";base="coap://[::1]:5700",</r/2>;ep="b";base="coap://[ff02::1]",'
        '</r/3>;ep="c";base="coap://host.example",</r/4>;base="coap://[::1]:5800"'
    )
    resources = (
        '<coap://[::1]:5700/t>;rt="temperature",<coap://[::1]:5700/h>;anchor="coap://[::1]:5700",'
        '<coap://[::2]/x>;anchor="coap://[::1]:5700",<coap://[ff02::1]/y>'
    )
    found, skipped = read_lookups(endpoints, resources)
    assert [(f.ep, f.base, [link.uri for link in f.links]) for f in found] == [
        ("a", "coap://[::1]:5700", ["coap://[::1]:5700/t", "coap://[::1]:5700/h"])
    ]
    assert skipped == 5


def hub_with_subscriber() -> tuple[Hub[str], str]:
    hub: Hub[str] = Hub(linger=0)
    hub.connect("c1")
    uri = "coap://10.0.0.1:5683/temp"
    hub.subscribe("c1", uri, 1)
    hub.upstream_response(uri, code="2.05", cf=0, payload=b"20")
    return hub, uri


def test_withdraw_keeps_the_subscription_and_says_why() -> None:
    hub, uri = hub_with_subscriber()
    commands = hub.withdraw(uri, "the registration of 'n1' expired (lifetime 60 s)")
    assert commands[0] == StopObservation(uri)
    assert isinstance(commands[1], Deliver)
    assert '"state":"offline"' in commands[1].text and "expired" in commands[1].text
    assert hub.observing_count == 0 and hub.subscription_count == 1
    assert hub.withdraw(uri, "the registration of 'n1' expired (lifetime 60 s)") == []
    assert hub.restore(uri) == [StartObservation(uri)]


def test_move_carries_sub_and_seq_to_the_new_address() -> None:
    hub, uri = hub_with_subscriber()
    sub = hub.resource(uri).sub  # type: ignore[union-attr]
    hub.withdraw(uri, "gone")
    new = "coap://10.0.0.2:5683/temp"
    assert hub.move(uri, new) == [StartObservation(new)]
    resource = hub.resource(new)
    assert resource is not None and hub.resource(uri) is None
    assert (resource.sub, resource.seq) == (sub, 1)
    commands = hub.upstream_response(new, code="2.05", cf=0, payload=b"21")
    texts = [c.text for c in commands if isinstance(c, Deliver)]
    assert '"the sensor answers again"' in texts[0] and '"seq":2' in texts[1] and new in texts[1]
    # The subscriber's unsubscribe still finds it by its sub, and ends the observation.
    assert StopObservation(new) in hub.unsubscribe("c1", sub)


def test_a_withdrawn_resource_left_by_its_last_subscriber_is_forgotten_in_time() -> None:
    hub, uri = hub_with_subscriber()
    hub.max_idle_resources = 0
    sub = hub.resource(uri).sub  # type: ignore[union-attr]
    hub.withdraw(uri, "gone")
    hub.unsubscribe("c1", sub)
    assert hub.resource(uri) is None


def test_the_registered_ct_decodes_answers_without_content_format() -> None:
    hub: Hub[str] = Hub(linger=0)
    uri = "coap://10.0.0.1:5683/count"
    hub.connect("c1")
    hub.subscribe("c1", uri, 1)
    hub.registered_cf = {uri: 60}.get
    commands = hub.upstream_response(uri, code="2.05", cf=None, payload=b"\x18\x2a")
    assert '"value":42' in [c for c in commands if isinstance(c, Deliver)][-1].text
