"""Tests for translator.config: section dataclasses, TOML loading, validation and overrides."""

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from translator.config import (
    ConfigError,
    GatewayConfig,
    LimitsConfig,
    PolicyConfig,
    SensorConfig,
    ServerConfig,
    apply_overrides,
    config_from_mapping,
    load_config,
    policy_for,
)

EXAMPLE = """\
[server]
host = "127.0.0.1"
port = 8765

[[sensors]]
name = "kitchen/temperature"
uri = "coap://127.0.0.1:5683/temperature"
observe = true

[policy]
allow = ["coap://127.0.0.1:5683/*"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_for(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    return info.value


# --- loading -----------------------------------------------------------------------------------


def test_load_the_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE))
    assert config.server == ServerConfig(host="127.0.0.1", port=8765, linger=5.0)
    assert config.sensors == (
        SensorConfig(
            name="kitchen/temperature", uri="coap://127.0.0.1:5683/temperature", observe=True
        ),
    )
    assert config.policy == PolicyConfig(allow=("coap://127.0.0.1:5683/*",))
    assert config.limits == LimitsConfig()
    assert config.log_level == "info"


def test_load_accepts_a_str_path(tmp_path: Path) -> None:
    assert load_config(str(write(tmp_path, EXAMPLE))).server.port == 8765


def test_policy_for_the_example(tmp_path: Path) -> None:
    policy = policy_for(load_config(write(tmp_path, EXAMPLE)))
    assert policy.allow == ("coap://127.0.0.1:5683/*",)
    assert policy.sensor_uris == frozenset({"coap://127.0.0.1:5683/temperature"})
    assert policy.allows("coap://127.0.0.1/anything")
    assert not policy.allows("coap://127.0.0.2/temperature")


def test_policy_for_allows_sensors_without_patterns() -> None:
    config = config_from_mapping({"sensors": [{"name": "t", "uri": "coap://10.0.0.5/t"}]})
    policy = policy_for(config)
    assert policy.allows("coap://10.0.0.5:5683/t")
    assert not policy.allows("coap://10.0.0.5/other")


def test_full_file(tmp_path: Path) -> None:
    text = """\
log_level = "debug"

[server]
host = "0.0.0.0"
port = 0
linger = 0

[[sensors]]
name = "a"
uri = "COAP://Sensor.LAN/a"

[[sensors]]
name = "b"
uri = "coaps://[::1]/b"
observe = false

[[credentials]]
match = "coaps://[::1]"
dtls_identity = "gw"
dtls_psk = "key"

[policy]
allow = ["*"]

[limits]
max_frame_bytes = 1024
max_subscriptions = 8
max_inflight = 4
max_queue = 16
"""
    config = load_config(write(tmp_path, text))
    assert config.log_level == "debug"
    assert config.server == ServerConfig(host="0.0.0.0", port=0, linger=0.0)
    assert [s.uri for s in config.sensors] == ["coap://sensor.lan:5683/a", "coaps://[::1]:5684/b"]
    assert [s.observe for s in config.sensors] == [False, False]
    assert [c.match for c in config.credentials] == ["coaps://[::1]:5684/*"]
    assert config.limits == LimitsConfig(
        max_frame_bytes=1024, max_subscriptions=8, max_inflight=4, max_queue=16
    )
    assert policy_for(config).allows_everything


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key == "<file>"
    assert "cannot read" in info.value.message
    assert "nope.toml" in str(info.value)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.key == "<file>"


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[server\nport = 1\n"))
    assert info.value.key == "<file>"
    assert "not valid TOML" in info.value.message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "<file>"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == GatewayConfig()


# --- defaults ----------------------------------------------------------------------------------


def test_defaults() -> None:
    config = config_from_mapping({})
    assert config == GatewayConfig()
    assert config.server == ServerConfig(host="127.0.0.1", port=8765, linger=5.0)
    assert config.sensors == ()
    assert config.policy == PolicyConfig(allow=())
    assert config.limits == LimitsConfig(
        max_frame_bytes=65536, max_subscriptions=256, max_inflight=32, max_queue=1024
    )
    assert config.log_level == "info"
    assert not policy_for(config).allows("coap://127.0.0.1/x")


def test_partial_section_keeps_other_defaults() -> None:
    config = config_from_mapping({"server": {"port": 9000}, "limits": {"max_queue": 5}})
    assert config.server == ServerConfig(port=9000)
    assert config.limits == LimitsConfig(max_queue=5)


def test_sensor_observe_defaults_to_false() -> None:
    config = config_from_mapping({"sensors": [{"name": "t", "uri": "coap://h/t"}]})
    assert config.sensors[0].observe is False


def test_int_is_accepted_for_float_and_stored_as_float() -> None:
    config = config_from_mapping({"server": {"linger": 3}})
    assert config.server.linger == 3.0
    assert isinstance(config.server.linger, float)
    assert isinstance(ServerConfig(linger=2).linger, float)


def test_sections_are_frozen() -> None:
    config = GatewayConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_level = "debug"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]


def test_sensor_uri_is_stored_normalized() -> None:
    sensor = SensorConfig(name="t", uri="coap://H/%7et")
    assert sensor.uri == "coap://h:5683/~t"


def test_mapping_arrays_may_be_tuples() -> None:
    config = config_from_mapping(
        {"policy": {"allow": ("coap://a/*",)}, "sensors": ({"name": "t", "uri": "coap://h/t"},)}
    )
    assert config.policy.allow == ("coap://a/*",)
    assert len(config.sensors) == 1


# --- validation: every error names its key --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        ({"server": {"port": 70000}}, "server.port", "must be an integer in 0..65535"),
        ({"server": {"port": -1}}, "server.port", "must be an integer in 0..65535"),
        ({"server": {"port": "8765"}}, "server.port", "must be an integer in 0..65535"),
        ({"server": {"port": 8765.0}}, "server.port", "must be an integer in 0..65535"),
        ({"server": {"host": 1}}, "server.host", "must be a non-empty string"),
        ({"server": {"host": ""}}, "server.host", "must be a non-empty string"),
        ({"server": {"linger": -0.5}}, "server.linger", "must be a number in 0..86400"),
        ({"server": {"linger": "5"}}, "server.linger", "must be a number in 0..86400"),
        ({"server": {"linger": float("nan")}}, "server.linger", "must be a number in 0..86400"),
        ({"server": {"linger": float("inf")}}, "server.linger", "must be a number in 0..86400"),
        (
            {"limits": {"max_frame_bytes": 0}},
            "limits.max_frame_bytes",
            "must be an integer in 1..",
        ),
        (
            {"limits": {"max_subscriptions": -1}},
            "limits.max_subscriptions",
            "must be an integer in 1..",
        ),
        ({"limits": {"max_inflight": 0}}, "limits.max_inflight", "must be an integer in 1.."),
        ({"limits": {"max_queue": 1.5}}, "limits.max_queue", "must be an integer in 1.."),
        (
            {"limits": {"max_inflight_bytes": -1}},
            "limits.max_inflight_bytes",
            "must be an integer in 0..",
        ),
        ({"log_level": "verbose"}, "log_level", "must be one of 'debug', 'info', 'warning'"),
        ({"log_level": 10}, "log_level", "must be one of"),
        ({"policy": {"allow": "coap://a/*"}}, "policy.allow", "must be an array of strings"),
        ({"policy": {"allow": [1]}}, "policy.allow[0]", "must be a string"),
        ({"sensors": {"name": "t"}}, "sensors", "must be an array of tables"),
        ({"sensors": ["coap://h/t"]}, "sensors[0]", "must be a table"),
        ({"server": "localhost"}, "server", "must be a table"),
        ({"limits": []}, "limits", "must be a table"),
    ],
)
def test_validation_error_names_its_key(data: dict[str, Any], key: str, message: str) -> None:
    error = error_for(data)
    assert error.key == key
    assert message in error.message
    assert str(error).startswith(f"config key '{key}': {message}")


def test_error_string_format() -> None:
    error = error_for({"server": {"port": 70000}})
    assert str(error) == (
        "config key 'server.port': must be an integer in 0..65535 (0 lets the OS pick), got 70000"
    )
    assert error.message == "must be an integer in 0..65535 (0 lets the OS pick), got 70000"


@pytest.mark.parametrize("section", ["server", "limits"])
def test_bool_is_not_an_int(section: str) -> None:
    key = "port" if section == "server" else "max_queue"
    error = error_for({section: {key: True}})
    assert error.key == f"{section}.{key}"
    assert error.message.endswith("got true")


def test_bool_is_not_a_float() -> None:
    assert error_for({"server": {"linger": False}}).key == "server.linger"


def test_int_is_not_a_bool() -> None:
    error = error_for({"sensors": [{"name": "t", "uri": "coap://h/t", "observe": 1}]})
    assert error.key == "sensors[0].observe"
    assert "must be a boolean (true or false), got 1" in error.message


def test_port_zero_is_allowed() -> None:
    assert config_from_mapping({"server": {"port": 0}}).server.port == 0


def test_linger_zero_is_allowed() -> None:
    assert config_from_mapping({"server": {"linger": 0.0}}).server.linger == 0.0


def test_sensor_uri_error_names_the_sensor_index() -> None:
    sensors = [
        {"name": "a", "uri": "coap://h/a"},
        {"name": "b", "uri": "coap://h/b"},
        {"name": "c", "uri": "http://h/c"},
    ]
    error = error_for({"sensors": sensors})
    assert error.key == "sensors[2].uri"
    assert error.message == "unsupported scheme 'http'; use coap:// or coaps://"


@pytest.mark.parametrize(
    ("sensor", "key", "message"),
    [
        ({"name": "", "uri": "coap://h/t"}, "sensors[0].name", "must be a non-empty string"),
        ({"name": 5, "uri": "coap://h/t"}, "sensors[0].name", "must be a non-empty string"),
        ({"name": "coap://h/t", "uri": "coap://h/t"}, "sensors[0].name", "must not contain '://'"),
        ({"name": "t", "uri": 5}, "sensors[0].uri", "must be a string"),
        ({"name": "t", "uri": "coap://h/t#x"}, "sensors[0].uri", "no fragment"),
        ({"uri": "coap://h/t"}, "sensors[0].name", "required key is missing"),
        ({"name": "t"}, "sensors[0].uri", "required key is missing"),
        ({"name": "t", "uri": "coap://h/t", "url": "x"}, "sensors[0].url", "unknown key"),
    ],
)
def test_sensor_errors(sensor: dict[str, Any], key: str, message: str) -> None:
    error = error_for({"sensors": [sensor]})
    assert error.key == key
    assert message in error.message


def test_duplicate_sensor_names() -> None:
    sensors = [
        {"name": "t", "uri": "coap://h/1"},
        {"name": "u", "uri": "coap://h/2"},
        {"name": "t", "uri": "coap://h/3"},
    ]
    error = error_for({"sensors": sensors})
    assert error.key == "sensors[2].name"
    assert "duplicate sensor name 't'" in error.message
    assert "sensors[0]" in error.message


def test_bad_allow_pattern_names_its_index() -> None:
    error = error_for({"policy": {"allow": ["coap://a/*", ""]}})
    assert error.key == "policy.allow[1]"
    assert "empty pattern" in error.message
    error = error_for({"policy": {"allow": ["http://a/*"]}})
    assert error.key == "policy.allow[0]"
    assert "unsupported scheme 'http'" in error.message


def test_error_in_file_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, EXAMPLE.replace("port = 8765", "port = 99999")))
    assert str(info.value).startswith("config key 'server.port': must be an integer in 0..65535")


# --- unknown keys and sections --------------------------------------------------------------


def test_unknown_key() -> None:
    error = error_for({"server": {"prot": 8765}})
    assert error.key == "server.prot"
    assert str(error).startswith("config key 'server.prot': unknown key")
    assert "did you mean 'port'?" in error.message


def test_unknown_key_without_a_close_match_lists_the_known_ones() -> None:
    error = error_for({"limits": {"zzz": 1}})
    assert error.key == "limits.zzz"
    assert "expected one of: max_frame_bytes, max_subscriptions, max_inflight, max_queue" in (
        error.message
    )


def test_unknown_section() -> None:
    error = error_for({"watchdog": {"restart": True}})
    assert error.key == "watchdog"
    assert error.message.startswith("unknown section")


def test_unknown_array_of_tables_is_a_section() -> None:
    error = error_for({"sensor": [{"name": "t", "uri": "coap://h/t"}]})
    assert error.key == "sensor"
    assert error.message == "unknown section (did you mean 'sensors'?)"


def test_unknown_top_level_key() -> None:
    error = error_for({"loglevel": "debug"})
    assert error.key == "loglevel"
    assert error.message == "unknown key (did you mean 'log_level'?)"


def test_unknown_key_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, EXAMPLE + "\n[limits]\nmax_frames = 3\n"))
    assert info.value.key == "limits.max_frames"


# --- direct construction is validated the same way ----------------------------------------------


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(port=True)
    assert info.value.key == "port"
    with pytest.raises(ConfigError) as info:
        SensorConfig(name="t", uri="http://h/")
    assert info.value.key == "uri"
    with pytest.raises(ConfigError) as info:
        GatewayConfig(log_level="trace")
    assert info.value.key == "log_level"


def test_config_error_attributes() -> None:
    error = ConfigError("server.port", "bad")
    assert (error.key, error.message) == ("server.port", "bad")
    assert str(error) == "config key 'server.port': bad"


# --- overrides ----------------------------------------------------------------------------------


@pytest.fixture
def example(tmp_path: Path) -> GatewayConfig:
    return load_config(write(tmp_path, EXAMPLE))


def test_no_overrides_is_identity(example: GatewayConfig) -> None:
    assert apply_overrides(example) == example


def test_override_host_and_port(example: GatewayConfig) -> None:
    config = apply_overrides(example, host="0.0.0.0", port=9000)
    assert config.server == ServerConfig(host="0.0.0.0", port=9000, linger=5.0)
    assert config.sensors == example.sensors
    assert example.server.port == 8765  # the original is untouched


def test_override_linger_and_log_level(example: GatewayConfig) -> None:
    config = apply_overrides(example, linger=0, log_level="debug")
    assert config.server.linger == 0.0
    assert config.log_level == "debug"


def test_override_appends_sensors(example: GatewayConfig) -> None:
    config = apply_overrides(example, sensors=["hall/light=coap://[::1]/light", "x=COAP://H/x"])
    assert [s.name for s in config.sensors] == ["kitchen/temperature", "hall/light", "x"]
    assert config.sensors[1] == SensorConfig(name="hall/light", uri="coap://[::1]:5683/light")
    assert config.sensors[2].uri == "coap://h:5683/x"


def test_override_sensor_with_existing_name_replaces_it(example: GatewayConfig) -> None:
    config = apply_overrides(
        example, sensors=["kitchen/temperature=coap://10.0.0.9/t", "later=coap://h/l"]
    )
    assert [s.name for s in config.sensors] == ["kitchen/temperature", "later"]
    assert config.sensors[0].uri == "coap://10.0.0.9:5683/t"


def test_override_same_new_sensor_twice_keeps_the_last(example: GatewayConfig) -> None:
    config = apply_overrides(example, sensors=["n=coap://h/1", "n=coap://h/2"])
    assert [(s.name, s.uri) for s in config.sensors[1:]] == [("n", "coap://h:5683/2")]


def test_override_sensor_uri_may_contain_equals(example: GatewayConfig) -> None:
    config = apply_overrides(example, sensors=["q=coap://h/x?a=1"])
    assert config.sensors[-1].uri == "coap://h:5683/x?a=1"


def test_override_appends_allow(example: GatewayConfig) -> None:
    config = apply_overrides(example, allow=["coap://[::1]/*"])
    assert config.policy.allow == ("coap://127.0.0.1:5683/*", "coap://[::1]/*")
    assert policy_for(config).allows("coap://[::1]:5683/x")


def test_override_sensors_feed_the_policy(example: GatewayConfig) -> None:
    config = apply_overrides(example, sensors=["far=coap://10.1.1.1/t"])
    assert policy_for(config).allows("coap://10.1.1.1/t")


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"host": ""}, "--host", "must be a non-empty string"),
        ({"port": 70000}, "--port", "must be an integer in 0..65535"),
        ({"port": True}, "--port", "must be an integer in 0..65535"),
        ({"linger": -1.0}, "--linger", "must be a number in 0..86400"),
        ({"log_level": "loud"}, "--log-level", "must be one of"),
        ({"sensors": ["no-equals-sign"]}, "--sensor", "expected NAME=URI"),
        ({"sensors": ["=coap://h/t"]}, "--sensor", "name in '=coap://h/t'"),
        ({"sensors": ["t=http://h/t"]}, "--sensor", "unsupported scheme 'http'"),
        ({"sensors": ["coap://h/t=coap://h/t"]}, "--sensor", "must not contain '://'"),
        ({"allow": [""]}, "--allow", "empty pattern"),
        ({"allow": ["http://h/*"]}, "--allow", "unsupported scheme 'http'"),
    ],
)
def test_override_errors_name_the_flag(
    example: GatewayConfig, overrides: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(example, **overrides)
    assert info.value.key == key
    assert message in info.value.message
    assert str(info.value).startswith(f"config key '{key}': ")


def test_override_with_a_bare_string_is_a_type_error(example: GatewayConfig) -> None:
    with pytest.raises(TypeError):
        apply_overrides(example, allow="coap://h/*")
    with pytest.raises(TypeError):
        apply_overrides(example, sensors="t=coap://h/t")


def test_new_sections_and_optional_fields() -> None:
    config = config_from_mapping({
        "supervision": {"grace": 2, "backoff_min": 0.5},
        "auth": {"tokens": [{"token": "s3cret", "scopes": ["read", "write"]}]},
        "server": {"tls_cert": "c.pem", "tls_key": "k.pem", "allowed_origins": ["http://a"]},
    })
    assert config.supervision.grace == 2.0 and config.supervision.backoff_max == 60.0
    assert config.auth.tokens[0].scopes == ("read", "write")
    assert "s3cret" not in repr(config)
    assert config.server.allowed_origins == ("http://a",)
    assert error_for({"auth": {"tokens": [{"token": "t", "scopes": ["admin"]}]}}).key == (
        "auth.tokens[0].scopes[0]"
    )
    assert error_for({"server": {"tls_cert": "c.pem"}}).key == "server.tls_key"
    assert error_for({"supervision": {"backoff_min": 5, "backoff_max": 1}}).key == (
        "supervision.backoff_max"
    )
    assert error_for({"auth": {"mode": "maybe"}}).key == "auth.mode"
    assert error_for({"limits": {"rate": -1}}).key == "limits.rate"


# --- every number has a range (issue 13 §7) ---------------------------------------------------


def _numeric_fields() -> list[tuple[str, str, Any]]:
    """(table, key, rule) of every numeric setting of every section."""
    import dataclasses as dc
    import typing as ty

    from translator import config as cfg

    sections = {"server": cfg.ServerConfig, "limits": cfg.LimitsConfig,
                "supervision": cfg.SupervisionConfig}
    found = []
    for table, section in sections.items():
        hints = ty.get_type_hints(section)
        for spec in dc.fields(section):
            kind = hints[spec.name]
            if kind in (int, float, int | None, float | None):
                found.append((table, spec.name, spec.metadata["rule"]))
    return found


def test_every_numeric_setting_has_a_range_and_says_what_zero_means() -> None:
    fields = _numeric_fields()
    assert len(fields) >= 20
    for table, key, rule in fields:
        assert rule.maximum is not None, f"{table}.{key} has no maximum"
        assert rule.above is not None or rule.minimum is not None, f"{table}.{key}"
        if rule.above is None and rule.minimum == 0:
            assert rule.zero, f"{table}.{key}: 0 is allowed, so say what it means"


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("supervision", "backoff_min", 0),
        ("supervision", "backoff_max", 0),
        ("supervision", "poll_min", 0),
        ("supervision", "registration_timeout", 0),
        ("limits", "handshake_timeout", 0),
        ("limits", "max_lag", 0),
        ("limits", "max_lag", 1e9),
        ("limits", "ping_interval", -1),
        ("limits", "max_frame_bytes", 1 << 40),
        ("limits", "rate", float("inf")),
        ("server", "linger", 1e12),
        ("supervision", "grace", -0.5),
    ],
)
def test_nonsense_numbers_are_errors_naming_the_key(table: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({table: {key: value}})
    assert refused.value.key == f"{table}.{key}"
    assert "must be" in refused.value.message


@pytest.mark.parametrize(
    ("table", "key"),
    [("limits", "ping_interval"), ("limits", "ping_timeout"), ("limits", "rate"),
     ("server", "linger"), ("server", "port"), ("supervision", "grace")],
)
def test_zero_is_accepted_where_it_means_something(table: str, key: str) -> None:
    config = config_from_mapping({table: {key: 0}})
    assert getattr(getattr(config, table), key) == 0


def test_a_range_error_says_what_zero_means() -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({"limits": {"ping_interval": -1}})
    assert "(0 disables pings)" in refused.value.message
    with pytest.raises(ConfigError) as refused:
        config_from_mapping({"supervision": {"poll_min": 0}})
    assert "> 0" in refused.value.message


@pytest.mark.parametrize(
    ("mapping", "key", "hint"),
    [
        ({"server": {"log_level": "debug"}}, "server.log_level", "belongs at the top level"),
        ({"limits": {"linger": 1}}, "limits.linger", "belongs under [server]"),
        ({"server": {"max_lag": 1}}, "server.max_lag", "belongs under [limits]"),
        ({"policy": {"backoff_min": 1}}, "policy.backoff_min", "belongs under [supervision]"),
        ({"server": {"dtls_psk": "k"}}, "server.dtls_psk", "belongs under [[credentials]]"),
    ],
)
def test_a_key_in_the_wrong_table_says_where_it_belongs(
    mapping: dict[str, Any], key: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_mapping(mapping)
    assert refused.value.key == key and hint in refused.value.message


def test_min_pmax_is_a_positive_number_of_seconds() -> None:
    assert config_from_mapping({}).limits.min_pmax == 1.0
    assert config_from_mapping({"limits": {"min_pmax": 0.2}}).limits.min_pmax == 0.2
    for bad in (0, -1, "1", 86_401):
        assert error_for({"limits": {"min_pmax": bad}}).key == "limits.min_pmax", bad
