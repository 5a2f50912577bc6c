"""Tests for translator.auth: tokens, principals, scopes and the startup rule."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from translator import auth as auth_module
from translator.auth import (
    ANONYMOUS,
    ENV_TOKEN,
    Principal,
    TokenStore,
    redact_query,
    scope_for_method,
    startup_problem,
)
from translator.config import AuthConfig, ConfigError, TokenConfig, config_from_mapping
from translator.core.policy import Policy

from .conftest import WAIT

SENSORS = {
    "kitchen/temperature": "coap://127.0.0.1:5683/temperature",
    "led": "coap://127.0.0.1:5683/led",
}
SECRET = "s3cret-Token_1"


def store(*tokens: TokenConfig, token_file: str | None = None,
          env: dict[str, str] | None = None) -> TokenStore:
    return TokenStore.from_config(
        AuthConfig(tokens=tokens, token_file=token_file), sensors=SENSORS, env=env or {}
    )


def bearer(token: str) -> str:
    return f"Bearer {token}"


def authed(tokens: TokenStore, header: str | None, query: str = "") -> Principal:
    principal = tokens.authenticate(header, query)
    assert principal is not None
    return principal


# --- authenticate -----------------------------------------------------------------------------


def test_bearer_header_authenticates() -> None:
    tokens = store(TokenConfig(token=SECRET, name="dash", scopes=("read", "write")))
    principal = tokens.authenticate(bearer(SECRET), "")
    assert principal is not None
    assert principal.name == "dash"
    assert principal.scopes == frozenset({"read", "write"})
    assert principal.allow is None


@pytest.mark.parametrize(
    "header",
    [f"bearer {SECRET}", f"BEARER {SECRET}", f"BeArEr   {SECRET}  ", f"  Bearer\t{SECRET}"],
)
def test_bearer_scheme_is_case_insensitive_and_whitespace_tolerant(header: str) -> None:
    assert store(TokenConfig(token=SECRET)).authenticate(header, "") is not None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        SECRET,
        f"Basic {SECRET}",
        f"Bearer {SECRET}x",
        f"Bearer {SECRET[:-1]}",
        f"Bearer {SECRET} extra",
        f"Bearer{SECRET}",
    ],
)
def test_wrong_or_malformed_header_is_refused(header: str) -> None:
    assert store(TokenConfig(token=SECRET)).authenticate(header, "") is None


def test_missing_token_is_refused() -> None:
    assert store(TokenConfig(token=SECRET)).authenticate(None, "") is None


@pytest.mark.parametrize(
    "query",
    [
        f"access_token={SECRET}",
        f"?access_token={SECRET}",
        f"x=1&access_token={SECRET}&y=2",
        "access_token=" + "".join(f"%{ord(c):02X}" for c in SECRET),
    ],
)
def test_access_token_query_parameter(query: str) -> None:
    principal = store(TokenConfig(token=SECRET, name="browser")).authenticate(None, query)
    assert principal is not None and principal.name == "browser"


@pytest.mark.parametrize(
    "query",
    [
        "",
        "access_token=",
        "access_token",
        f"access_token={SECRET}&access_token={SECRET}",  # repeated: ambiguous
        f"token={SECRET}",
        f"Access_Token={SECRET}",
        "access_token=%ff%fe",
        "&".join(["a=1"] * 100) + f"&access_token={SECRET}",  # too many fields
    ],
)
def test_bad_access_token_query_presents_no_token(query: str) -> None:
    assert store(TokenConfig(token=SECRET)).authenticate(None, query) is None


def test_plus_in_the_query_is_a_space_so_it_must_be_escaped() -> None:
    tokens = store(TokenConfig(token="a+b"))
    assert tokens.authenticate(None, "access_token=a+b") is None
    assert tokens.authenticate(None, "access_token=a%2Bb") is not None
    assert tokens.authenticate("Bearer a+b", "") is not None


def test_bearer_header_wins_over_the_query() -> None:
    tokens = store(TokenConfig(token=SECRET, name="a"), TokenConfig(token="other", name="b"))
    assert authed(tokens, bearer("other"), f"access_token={SECRET}").name == "b"
    assert tokens.authenticate(bearer("wrong"), f"access_token={SECRET}") is None
    # A header that is not Bearer does not hide the query.
    assert authed(tokens, "Basic xyz", f"access_token={SECRET}").name == "a"


def test_no_tokens_authenticates_nobody() -> None:
    empty = store()
    assert len(empty) == 0
    assert empty.authenticate(bearer(SECRET), "") is None
    assert TokenStore().authenticate(bearer(SECRET), "") is None


def test_each_token_gets_its_own_principal() -> None:
    tokens = store(
        TokenConfig(token="t1", name="one"),
        TokenConfig(token="t2", name="two", scopes=("write",)),
        TokenConfig(token="t3", name="three", scopes=()),
    )
    names = [authed(tokens, bearer(t)).name for t in ("t1", "t2", "t3")]
    assert names == ["one", "two", "three"]
    assert authed(tokens, bearer("t3")).scopes == frozenset()


def test_non_ascii_presented_token_is_just_wrong() -> None:
    tokens = store(TokenConfig(token=SECRET))
    assert tokens.authenticate("Bearer caf\u00e9", "") is None
    assert tokens.authenticate("Bearer \ud800", "") is None
    assert tokens.authenticate(None, "access_token=%C3%A9") is None


def test_every_configured_token_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    # Constant time: no early exit, whichever token matches; digests of one fixed length.
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    tokens = store(*(TokenConfig(token=f"token-{i}" * (i + 1), name=str(i)) for i in range(5)))
    for presented in ["token-0", "token-4" * 5, "nope", "x" * 5000]:
        compared.clear()
        tokens.authenticate(bearer(presented), "")
        assert len(compared) == 5
        assert {len(a) for a, _ in compared} | {len(b) for _, b in compared} == {32}
        assert all(b == hashlib.sha256(presented.encode()).digest() for _, b in compared)


# --- token sources ----------------------------------------------------------------------------


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        "# the dashboard\n"
        "\n"
        "reader-token\n"
        "  writer-token   read   write  \n"
        "only-write write # the PLC\n"
        "\t# indented comment\n"
    )
    tokens = store(token_file=str(path))
    assert len(tokens) == 3
    reader = tokens.authenticate(bearer("reader-token"), "")
    writer = tokens.authenticate(bearer("writer-token"), "")
    only_write = tokens.authenticate(bearer("only-write"), "")
    assert reader is not None and reader.scopes == frozenset({"read"})
    assert reader.name == "token_file:3"
    assert writer is not None and writer.scopes == frozenset({"read", "write"})
    assert only_write is not None and only_write.scopes == frozenset({"write"})
    assert tokens.authenticate(bearer("#"), "") is None


def test_token_file_with_a_bad_scope_names_the_line_but_not_the_word(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("good\n\nsecret-one secret-two\n")
    with pytest.raises(ConfigError) as info:
        store(token_file=str(path))
    assert info.value.key == "auth.token_file"
    assert "line 3" in info.value.message
    assert "secret" not in str(info.value)


def test_unreadable_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        store(token_file=str(tmp_path / "missing"))
    assert info.value.key == "auth.token_file"
    assert "cannot read" in info.value.message
    with pytest.raises(ConfigError, match="cannot read"):
        store(token_file=str(tmp_path))  # a directory


def test_token_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(b"tok\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        store(token_file=str(path))
    assert info.value.key == "auth.token_file"


def test_token_file_without_tokens_is_an_error(tmp_path: Path) -> None:
    # Otherwise an emptied file would silently switch authentication off.
    path = tmp_path / "tokens"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="contains no token"):
        store(token_file=str(path))


def test_token_file_with_a_non_printable_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("ok\ncaf\u00e9\n")
    with pytest.raises(ConfigError) as info:
        store(token_file=str(path))
    assert info.value.message.startswith("line 2: ")
    assert "caf" not in str(info.value)


def test_environment_token_reads_and_writes() -> None:
    tokens = store(env={ENV_TOKEN: f"  {SECRET}\n", "OTHER": "x"})
    principal = tokens.authenticate(bearer(SECRET), "")
    assert principal is not None
    assert principal.scopes == frozenset({"read", "write"})
    assert ENV_TOKEN in principal.name
    assert tokens.authenticate(bearer("x"), "") is None


def test_empty_environment_token_is_ignored() -> None:
    assert len(store(env={ENV_TOKEN: ""})) == 0
    assert len(store(env={ENV_TOKEN: "   "})) == 0


def test_all_three_sources_combine(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("from-file\n")
    tokens = store(
        TokenConfig(token="from-config", name="cfg"),
        token_file=str(path),
        env={ENV_TOKEN: "from-env"},
    )
    assert len(tokens) == 3
    assert tokens.names == ("cfg", "token_file:1", f"env:{ENV_TOKEN}")
    for token in ("from-config", "from-file", "from-env"):
        assert tokens.authenticate(bearer(token), "") is not None


def test_the_same_token_twice_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        store(TokenConfig(token=SECRET, scopes=("read",)), TokenConfig(token=SECRET))
    assert info.value.key == "auth.tokens[1].token"
    assert "auth.tokens[0].token" in info.value.message
    assert SECRET not in str(info.value)
    path = tmp_path / "tokens"
    path.write_text(f"{SECRET} write\n")
    with pytest.raises(ConfigError) as info:
        store(TokenConfig(token=SECRET), token_file=str(path))
    assert info.value.key == "auth.token_file"
    assert info.value.message.startswith("line 1: ")
    with pytest.raises(ConfigError) as info:
        store(TokenConfig(token=SECRET), env={ENV_TOKEN: SECRET})
    assert info.value.key == ENV_TOKEN


@pytest.mark.parametrize("token", ["has space", "tab\there", "line\nbreak", "caf\u00e9", "\x7f"])
def test_config_token_that_a_header_cannot_carry(token: str) -> None:
    with pytest.raises(ConfigError) as info:
        store(TokenConfig(token="fine"), TokenConfig(token=token))
    assert info.value.key == "auth.tokens[1].token"
    assert token not in str(info.value)
    with pytest.raises(ConfigError) as info:
        store(env={ENV_TOKEN: token})
    assert info.value.key == ENV_TOKEN


def test_from_config_accepts_a_loaded_configuration() -> None:
    config = config_from_mapping(
        {"auth": {"tokens": [{"token": SECRET, "name": "n", "scopes": ["write"]}]}}
    )
    tokens = TokenStore.from_config(config.auth, sensors={}, env={})
    assert authed(tokens, bearer(SECRET)).scopes == frozenset({"write"})


# --- allow narrowing --------------------------------------------------------------------------


def test_allow_with_sensor_names_and_patterns() -> None:
    token = TokenConfig(token=SECRET, allow=("led", "coap://127.0.0.1:5683/public/*"))
    principal = store(token).authenticate(bearer(SECRET), "")
    assert principal is not None
    assert principal.allow_names == frozenset({"led"})
    assert principal.allows("coap://127.0.0.1/led")
    assert principal.allows("coap://127.0.0.1:5683/public/x")
    assert not principal.allows("coap://127.0.0.1/temperature")
    assert not principal.allows("coap://127.0.0.1/led/")
    assert principal.allows("coap://127.0.0.1/led", SENSORS)
    assert not principal.allows("coap://127.0.0.1/temperature", SENSORS)


def test_allow_names_are_looked_up_in_the_given_sensor_table() -> None:
    principal = Principal("p", frozenset({"read"}), allow_names=frozenset({"kitchen/temperature"}))
    assert not principal.allows("coap://127.0.0.1/temperature")
    assert principal.allows("coap://127.0.0.1/temperature", SENSORS)
    assert not principal.allows("coap://127.0.0.1/led", SENSORS)


def test_no_allow_list_means_no_narrowing() -> None:
    principal = store(TokenConfig(token=SECRET)).authenticate(bearer(SECRET), "")
    assert principal is not None and principal.allow is None
    assert principal.allows("coap://anything.example/x")
    assert ANONYMOUS.allows("coap://anything.example/x")


def test_allow_narrowing_keeps_the_special_destination_rule() -> None:
    principal = Principal("p", frozenset({"read"}), allow=Policy(allow=("coap://*/*",)))
    assert principal.allows("coap://10.0.0.1/x")
    assert not principal.allows("coap://224.0.1.187/x")


def test_allow_entry_neither_name_nor_pattern() -> None:
    with pytest.raises(ConfigError) as info:
        store(TokenConfig(token=SECRET, allow=("led", "kitchen/humidity")))
    assert info.value.key == "auth.tokens[0].allow[1]"
    assert "neither a configured sensor name nor a valid pattern" in info.value.message


def test_a_sensor_name_wins_over_the_same_text_as_a_pattern() -> None:
    tokens = TokenStore.from_config(
        AuthConfig(tokens=(TokenConfig(token=SECRET, allow=("*",)),)),
        sensors={"*": "coap://h/only"},
        env={},
    )
    principal = tokens.authenticate(bearer(SECRET), "")
    assert principal is not None
    assert principal.allows("coap://h/only")
    assert not principal.allows("coap://h/other")


def test_can() -> None:
    reader = Principal("r", frozenset({"read"}))
    assert reader.can("read") and not reader.can("write")
    assert ANONYMOUS.can("read") and ANONYMOUS.can("write")


# --- scopes, startup, logging -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "scope"),
    [
        ("GET", "read"),
        ("subscribe", "read"),
        ("list", "read"),
        ("POST", "write"),
        ("PUT", "write"),
        ("DELETE", "write"),
        ("FETCH", "write"),
        ("PATCH", "write"),
        ("iPATCH", "write"),
    ],
)
def test_scope_for_method(method: str, scope: str) -> None:
    assert scope_for_method(method) == scope


@pytest.mark.parametrize("method", ["get", "IPATCH", "BREW", "ping", "unsubscribe", ""])
def test_scope_for_unknown_method(method: str) -> None:
    with pytest.raises(ValueError, match="no scope"):
        scope_for_method(method)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST.", "::ffff:127.0.0.1"],
)
def test_no_tokens_on_loopback_is_allowed(host: str) -> None:
    assert startup_problem(host, AuthConfig(), store()) is None


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.10", "2001:db8::1", "gateway.lan", "", "128.0.0.1"]
)
def test_no_tokens_elsewhere_is_refused(host: str) -> None:
    problem = startup_problem(host, AuthConfig(), store())
    assert problem is not None
    assert '[auth] mode = "none"' in problem and "--no-auth" in problem
    assert ENV_TOKEN in problem


def test_tokens_or_mode_none_allow_any_address() -> None:
    assert startup_problem("0.0.0.0", AuthConfig(), store(TokenConfig(token=SECRET))) is None
    assert startup_problem("0.0.0.0", AuthConfig(mode="none"), store()) is None


@pytest.mark.parametrize(
    ("path", "redacted"),
    [
        ("/ws?access_token=s3cret", "/ws"),
        ("/ws", "/ws"),
        ("/?a=1&access_token=x", "/"),
        ("/ws?", "/ws"),
        ("/x#frag?access_token=y", "/x"),
    ],
)
def test_redact_query(path: str, redacted: str) -> None:
    assert redact_query(path) == redacted


# --- no token in reprs -----------------------------------------------------------------------


def test_reprs_never_show_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("file-secret-123 write\n")
    config_token = TokenConfig(token="config-secret-456", name="dash", allow=("led",))
    tokens = store(config_token, token_file=str(path), env={ENV_TOKEN: "env-secret-789"})
    texts = [repr(tokens), str(tokens), repr(config_token)]
    texts += [repr(tokens.authenticate(bearer(t), "")) for t in
              ("file-secret-123", "config-secret-456", "env-secret-789")]
    for text in texts:
        for secret in ("file-secret-123", "config-secret-456", "env-secret-789"):
            assert secret not in text
    assert "dash" in repr(tokens)


def test_store_keeps_no_token_text() -> None:
    tokens = store(TokenConfig(token="config-secret-456"))

    def walk(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                yield from walk(getattr(value, f.name))
        elif isinstance(value, tuple | frozenset):
            for item in value:
                yield from walk(item)
        else:
            yield value

    assert not any(isinstance(v, str) and "config-secret" in v for v in walk(tokens))


@given(st.text(max_size=80), st.text(max_size=200))
def test_authenticate_never_raises(header: str, query: str) -> None:
    tokens = store(TokenConfig(token=SECRET))
    result = tokens.authenticate(header, query)
    assert result is None or result.name == "token"


# --- at the handshake (end to end) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "why"),
    [
        # Two Authorization headers are ambiguous: no token is taken from either.
        ([("Authorization", f"Bearer {SECRET}"), ("Authorization", f"Bearer {SECRET}")], 401,
         "a valid token is required"),
        # Two Origin headers: which page is asking cannot be told.
        ([("Authorization", f"Bearer {SECRET}"), ("Origin", "http://a"), ("Origin", "http://b")],
         403, "more than one Origin header"),
    ],
    ids=["two-authorization-headers", "two-origin-headers"],
)
async def test_repeated_handshake_headers_are_refused_cleanly(
    headers: list[tuple[str, str]], status: int, why: str, make_gateway: Any
) -> None:
    gateway = await make_gateway(
        {"server": {"host": "127.0.0.1", "port": 0}, "auth": {"tokens": [{"token": SECRET}]}}
    )
    with pytest.raises(InvalidStatus) as info:
        async with connect(gateway.url, additional_headers=headers, open_timeout=WAIT):
            pass
    assert info.value.response.status_code == status
    assert why in info.value.response.body.decode()
