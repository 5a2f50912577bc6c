"""The cluster's pure parts, without NATS: the hub relaying frames another hub made, the
names every node derives alike, and the `[cluster]` configuration."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from translator.cluster.names import Names, cluster_sub, default_node_name, resource_key
from translator.cluster.wire import Published, decode
from translator.config import ConfigError, apply_overrides, config_from_mapping
from translator.core.conditions import Condition
from translator.core.history import History
from translator.core.hub import Deliver, Hub, NotifyMeta, StartObservation, StopObservation

TEMP = "coap://127.0.0.1/temperature"
SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def owner_and_node() -> tuple[Hub[str], Hub[str]]:
    """An owner hub (its subscriber stands for the cluster) and another node's hub."""
    owner: Hub[str] = Hub(linger=0, sub_for=cluster_sub, history=History(size=0))
    node: Hub[str] = Hub(linger=0, sub_for=cluster_sub)
    owner.subscribe("seat", TEMP)
    node.subscribe("client", TEMP)
    return owner, node


def published(commands: list[object]) -> list[str]:
    return [c.text for c in commands if isinstance(c, Deliver)]


def test_nodes_name_a_resource_alike_and_in_what_nats_can_carry() -> None:
    uri = "coap://[fe80::1%25eth0]:5683/a b/c.d?x=*&y=>"
    assert resource_key(uri) == resource_key(uri)
    assert resource_key(uri) != resource_key(uri + "1")
    assert SUBJECT_TOKEN.match(resource_key(uri))
    assert cluster_sub(uri) == "r" + resource_key(uri)
    names = Names("site-1")
    assert names.subject(resource_key(uri)).split(".")[-1] == resource_key(uri)
    assert SUBJECT_TOKEN.match(default_node_name())
    a: Hub[str] = Hub(sub_for=cluster_sub)
    b: Hub[str] = Hub(sub_for=cluster_sub)
    b.subscribe("x", "coap://127.0.0.1/other")  # known in a different order
    b.epoch = a.epoch  # what a node takes from the cluster when it joins
    assert a.subscribe("c", TEMP)[0] == b.subscribe("c", TEMP)[0]


def test_a_relayed_notify_is_delivered_as_the_owner_made_it_once() -> None:
    owner, node = owner_and_node()
    made = published(owner.upstream_response(TEMP, code="2.05", cf=0, payload=b"21.5"))
    status_online, notify = made
    assert json.loads(notify)["seq"] == 1
    assert published(node.relay(TEMP, status_online)) == [status_online]
    commands = node.relay(TEMP, notify)
    assert commands == [Deliver(("client",), notify, cluster_sub(TEMP), NotifyMeta(1))]
    assert commands[0].text is notify  # the same text: encoded once, by the owner
    assert node.relay(TEMP, notify) == []  # a copy (NATS echo, the stream's last) is no news
    assert node.relay(TEMP, status_online) == []
    # A late joiner gets the cached value; `list` sees the value.
    assert notify in published(node.subscribe("late", TEMP))
    assert node.resource(TEMP) is not None and node.resource(TEMP).seq == 1  # type: ignore[union-attr]


def test_relay_keeps_history_for_resume_and_ignores_what_is_not_watched() -> None:
    owner, node = owner_and_node()
    texts = [published(owner.upstream_response(TEMP, code="2.05", cf=0, payload=str(v).encode()))
             [-1] for v in range(4)]
    for text in texts:
        node.relay(TEMP, text)
    epoch = node.subscribe("c2", TEMP)
    assert epoch  # subscribed
    since = node.epoch_of(node.resource(TEMP))  # type: ignore[arg-type]
    from translator.core.frames import Since

    replay = published(node.subscribe("c3", TEMP, since=Since(since, 2)))
    assert [json.loads(t)["seq"] for t in replay[1:]] == [3, 4]
    assert node.relay("coap://127.0.0.1/unwatched", texts[0]) == []


def test_seed_continues_numbering_and_rebase_takes_a_lower_one() -> None:
    owner, node = owner_and_node()
    old = published(owner.upstream_response(TEMP, code="2.05", cf=0, payload=b"1"))[-1]
    successor: Hub[str] = Hub(linger=0, sub_for=cluster_sub)
    successor.seed(TEMP, old)
    commands = successor.subscribe("seat", TEMP)
    assert StartObservation(TEMP) in commands
    nxt = published(successor.upstream_response(TEMP, code="2.05", cf=0, payload=b"2"))[-1]
    assert json.loads(nxt)["seq"] == 2
    node.relay(TEMP, nxt)
    assert node.relay(TEMP, old) == []  # older than what the node holds
    node.rebase(TEMP)
    assert published(node.relay(TEMP, old)) == [old]


def test_a_relayed_status_changes_the_state_late_joiners_see() -> None:
    owner, node = owner_and_node()
    for text in published(owner.upstream_response(TEMP, code="2.05", cf=0, payload=b"1")):
        node.relay(TEMP, text)
    stale = published(owner.upstream_stale(TEMP, "Max-Age passed"))
    assert published(node.relay(TEMP, stale[0])) == stale
    assert stale[0] in published(node.subscribe("late", TEMP))


def test_relayed_notifies_carry_what_cbor_and_compact_clients_need() -> None:
    """The owner's CBOR data item crosses NATS as the sensor's bytes (`wire`), and the
    node says what changed since the update before, as the owner would."""
    owner, node = owner_and_node()
    item = cbor2.dumps({"t": 21.5, "big": 2**70, "raw": b"\x00\x01"})

    def through_nats(**answer: object) -> tuple[str, bytes | None]:
        (notify,) = [c for c in owner.upstream_response(TEMP, code="2.05", **answer)  # type: ignore[arg-type]
                     if isinstance(c, Deliver) and c.meta is not None]
        assert notify.meta is not None
        message = Published(notify.text, item, notify.meta.cbor_value is not None).encode()
        got = decode(message)
        assert got.text == notify.text
        return got.text, got.cbor_value

    metas = []
    for max_age in (60, 60, 30):
        text, cbor_value = through_nats(cf=60, payload=item, max_age=max_age)
        assert cbor_value == item
        (deliver,) = node.relay(TEMP, text, cbor_value)
        assert isinstance(deliver, Deliver) and deliver.text is text
        metas.append(deliver.meta)
    assert metas == [NotifyMeta(1, item, None), NotifyMeta(2, item, ()),
                     NotifyMeta(3, item, ("max_age",))]
    # A gap (seq 4 never reached this node): nothing to diff with, the frame goes complete.
    through_nats(cf=60, payload=item)
    text, cbor_value = through_nats(cf=60, payload=item)
    (deliver,) = node.relay(TEMP, text, cbor_value)
    assert isinstance(deliver, Deliver) and deliver.meta == NotifyMeta(5, item, None)
    # A late joiner's cached notify keeps the item.
    late = [c for c in node.subscribe("late", TEMP) if isinstance(c, Deliver) and c.meta]
    assert late[0].meta == NotifyMeta(5, item)
    # A frame alone (a status, or what earlier versions published) decodes as before.
    assert decode(b'{"type":"status"}') == Published('{"type":"status"}')
    for junk in (b"{}\n", b"{}\n\x80", b"\xff\n\x00"):
        with pytest.raises(ValueError):
            decode(junk)


def test_a_conditional_subscription_judges_relayed_notifies() -> None:
    owner, node = owner_and_node()
    node.subscribe("cond", TEMP, cond=Condition(st=1.0))
    got: dict[str, list[float]] = {"client": [], "cond": []}
    for value in (20.0, 20.5, 21.2, 21.4, 23.0):
        text = published(owner.upstream_response(TEMP, code="2.05", cf=50,
                                                 payload=json.dumps(value).encode()))[-1]
        for command in node.relay(TEMP, text):
            if isinstance(command, Deliver) and '"notify"' in command.text:
                for target in command.targets:
                    got[target].append(json.loads(command.text)["value"])
    assert got["client"] == [20.0, 20.5, 21.2, 21.4, 23.0]
    assert got["cond"] == [20.0, 21.2, 23.0]  # st = 1: a change of at least 1 since the last


def test_an_rd_move_in_a_cluster_says_offline_rather_than_going_silent() -> None:
    """A cluster numbers by URI: the subscription cannot follow the endpoint elsewhere."""
    node: Hub[str] = Hub(linger=0, sub_for=cluster_sub)
    node.subscribe("client", TEMP)
    commands = node.move(TEMP, "coap://127.0.0.2/temperature")
    assert StopObservation(TEMP) in commands
    (status,) = published(commands)
    assert json.loads(status)["state"] == "offline" and "subscribe again" in status
    single: Hub[str] = Hub(linger=0)
    single.subscribe("client", TEMP)
    assert StartObservation("coap://127.0.0.2/temperature") in single.move(
        TEMP, "coap://127.0.0.2/temperature")


def test_cluster_configuration_and_flags() -> None:
    config = config_from_mapping({"cluster": {"nats": ["nats://127.0.0.1:4222"], "node": "a-1"}})
    assert config.cluster.enabled and config.cluster.node == "a-1"
    assert not config_from_mapping({}).cluster.enabled
    flagged = apply_overrides(config_from_mapping({}), nats=["tls://n:4222"], node="b")
    assert flagged.cluster.nats == ("tls://n:4222",) and flagged.cluster.node == "b"
    for bad, key in (
        ({"nats": ["http://x"]}, "nats"),
        ({"nats": ["nats://x"], "node": "a.b"}, "node"),
        ({"nats": ["nats://x"], "lease_ttl": 0.5}, "lease_ttl"),
        ({"nats": ["nats://x"], "tls_cert": "c.pem"}, "tls_cert"),
    ):
        with pytest.raises(ConfigError) as info:
            config_from_mapping({"cluster": bad})
        assert key in str(info.value), (bad, str(info.value))
    with pytest.raises(ConfigError) as info:
        apply_overrides(config_from_mapping({}), nats=["bogus"])
    assert "--nats" in str(info.value)
    files = apply_overrides(config_from_mapping({}), nats=["tls://n:4222"], nats_files={
        "credentials": "u.creds", "tls_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "k.pem",
    }).cluster
    assert (files.credentials, files.tls_ca, files.tls_cert, files.tls_key) == (
        "u.creds", "ca.pem", "c.pem", "k.pem")
    kept = apply_overrides(
        config_from_mapping({"cluster": {"nats": ["tls://n"], "tls_ca": "site.pem"}}),
        nats_files={"tls_ca": None, "tls_cert": None},
    ).cluster
    assert kept.tls_ca == "site.pem"


@pytest.mark.parametrize(("flags", "named"), [
    (["--nats", "bogus"], "--nats"),
    (["--nats", "nats://127.0.0.1:1", "--node", "a.b"], "--node"),
    # Half a client certificate: the missing flag is named.
    (["--nats", "nats://127.0.0.1:1", "--nats-tls-cert", "c.pem"], "--nats-tls-key"),
    (["--nats", "nats://127.0.0.1:1", "--nats-tls-key", "k.pem"], "--nats-tls-cert"),
    (["--nats", "tls://127.0.0.1:1", "--nats-tls-ca", "/nonexistent/ca.pem"], "tls_ca"),
    (["--nats", "tls://127.0.0.1:1", "--nats-tls-cert", "/nonexistent/c.pem",
      "--nats-tls-key", "/nonexistent/k.pem"], "tls_cert"),
    (["--nats", "nats://127.0.0.1:1", "--nats-credentials", "/nonexistent/x.creds"],
     "credentials"),
])
def test_serve_refuses_bad_cluster_flags_with_exit_2(
    flags: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from translator.cli import main

    assert main(["serve", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


@pytest.mark.parametrize(("flags", "named"), [
    (["--port", "0"], "--port 0"),
    (["--port", "65535"], "--port 65535"),
    (["--nodes", "0"], "--nodes 0"),
    (["--nats-port", "70000"], "--nats-port 70000"),
])
def test_cluster_demo_refuses_bad_flags_with_exit_2(flags: list[str], named: str) -> None:
    """`make cluster-demo`'s script: a port it could not print a working URL for is refused
    before anything starts."""
    demo = Path(__file__).parent.parent / "examples" / "cluster_demo.py"
    done = subprocess.run(
        [sys.executable, str(demo), *flags], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done
    assert named in done.stderr and "Traceback" not in done.stderr


def test_cluster_demo_names_a_port_in_use_with_exit_2() -> None:
    demo = Path(__file__).parent.parent / "examples" / "cluster_demo.py"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(demo), "--nats-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 2, done
    assert f"port {port} on 127.0.0.1 is in use" in done.stderr


def owner_frames(count: int) -> tuple[Hub[str], list[str]]:
    """An owner hub and the notify frames of its first `count` updates (seq 1 to count)."""
    owner: Hub[str] = Hub(linger=0, sub_for=cluster_sub, history=History(size=0))
    owner.subscribe("seat", TEMP)
    texts = [published(owner.upstream_response(TEMP, code="2.05", cf=0, payload=str(v).encode()))
             [-1] for v in range(count)]
    return owner, texts


def seqs(texts: list[str]) -> list[int]:
    return [json.loads(t)["seq"] for t in texts if json.loads(t)["type"] == "notify"]


def test_preload_lets_a_node_that_never_watched_resume_from_the_clusters_frames() -> None:
    from translator.core.frames import Since

    _, texts = owner_frames(6)
    node: Hub[str] = Hub(linger=0, sub_for=cluster_sub, history=History(size=4))
    node.epoch = "cluster"  # the cluster's, from its meta bucket
    since = Since(f"cluster-{cluster_sub(TEMP)}", 2)
    assert node.wants_history(TEMP, since)
    assert not node.wants_history(TEMP, Since("another-run", 2))  # nothing to resume
    assert not Hub[str](linger=0).wants_history(TEMP, since)  # no cluster: no shared sub
    junk = ["not json", '{"type":"status","sub":"x","uri":"u","state":"online"}', "[1]"]
    node.preload(TEMP, [(t, None) for t in [*junk, *texts]])
    resource = node.resource(TEMP)
    assert resource is not None and resource.seq == 6 and not resource.observing
    assert resource.last_notify == texts[-1]
    assert node.idle_bytes > 0  # known, unwatched: within the idle bounds until subscribed
    assert not node.wants_history(TEMP, since)

    commands = node.subscribe("c", TEMP, since=since)
    subscribed, *replayed = published(commands)
    assert json.loads(subscribed)["recovered"] is True
    assert seqs(replayed) == [3, 4, 5, 6]
    assert all(json.loads(t)["replay"] is True for t in replayed)
    assert StartObservation(TEMP) in commands
    assert node.idle_bytes == 0
    # Older than the 4 frames kept: the latest value, not recovered.
    old = published(node.subscribe("d", TEMP, since=Since(since.epoch, 1)))
    assert json.loads(old[0])["recovered"] is False and old[1] == texts[-1]


def test_preload_while_relaying_takes_only_older_frames_and_never_goes_back() -> None:
    from translator.core.frames import Since

    owner, texts = owner_frames(6)
    node: Hub[str] = Hub(linger=0, sub_for=cluster_sub, history=History(size=8))
    node.epoch = "cluster"
    node.subscribe("watcher", TEMP)
    node.preload(TEMP, [(t, None) for t in texts])  # observed, no frame yet: left alone
    assert node.resource(TEMP).seq == 0  # type: ignore[union-attr]
    node.relay(TEMP, texts[4])
    node.relay(TEMP, texts[5])
    since = Since(f"cluster-{cluster_sub(TEMP)}", 2)
    assert node.wants_history(TEMP, since)
    newer = published(owner.upstream_response(TEMP, code="2.05", cf=0, payload=b"7"))[-1]
    # Frames 1 and 2 are gone from the stream (a gap before 4: frame 3 is missing too).
    node.preload(TEMP, [(t, None) for t in [texts[0], *texts[3:], newer]])
    assert node.resource(TEMP).seq == 6  # type: ignore[union-attr]
    assert node.history.kept(TEMP)[0][0] == 4  # contiguous with the latest only
    # The newer frame still reaches the node's subscribers when it is relayed.
    assert published(node.relay(TEMP, newer)) == [newer]
    assert node.wants_history(TEMP, since)  # 3 is missing: no resume from 2
    back = Since(since.epoch, 3)
    replay = published(node.subscribe("c", TEMP, since=back))
    assert json.loads(replay[0])["recovered"] is True and seqs(replay[1:]) == [4, 5, 6, 7]
    # A preload of older frames never moves the numbering back.
    node.preload(TEMP, [(t, None) for t in texts[:3]])
    assert node.resource(TEMP).seq == 7  # type: ignore[union-attr]
    assert [seq for seq, _ in node.history.kept(TEMP)] == [1, 2, 3, 4, 5, 6]
