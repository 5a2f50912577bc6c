"""The dashboard at `/` (translator/static/index.html, dashboard.js; issue 14 §3-4) in a real
browser: Playwright driving Chromium, headless, against a real gateway and the simulated
sensors, all on loopback with ports from the OS.

The gateway runs in this test's event loop (so a test can stop it and start it again on the
same port), and the browser is driven with Playwright's async API in the same loop. Nothing
waits by sleeping: every wait is for something the page shows, with a generous timeout.
Each test also checks that the page broke no rule of its Content-Security-Policy and threw
no uncaught exception.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import pytest_asyncio

from translator.config import config_from_mapping
from translator.gateway import Gateway
from translator.sim import SimulatedSensors

from .browser import browser_missing, launch
from .conftest import gateway_config
from .optional import need

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # the part is missing: every test here skips (or fails in CI), saying so
    pass
else:
    expect.set_options(timeout=60_000)

WAIT_MS: Final = 60_000
"""How long the page may take to show something (the machine may be shared and slow)."""
TOKEN: Final = "dashboard-test-token"
VIEWPORT: Final = {"width": 1280, "height": 800}

# Runs before the page's own scripts (Playwright injects it; the page's CSP does not apply).
WATCH_VIOLATIONS: Final = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


@dataclass
class Dashboard:
    page: Page
    errors: list[str] = field(default_factory=list)

    def row(self, name: str) -> Any:
        return self.page.locator(f'#rows tr[data-name="{name}"]')

    async def seq(self, name: str) -> int:
        return int(await self.row(name).get_attribute("data-seq") or 0)

    async def seq_changes(self, name: str, seq: int) -> int:
        """Wait until `name`'s row shows another seq than `seq`; the new one."""
        await self.page.wait_for_function(
            "([name, seq]) => {"
            "  const row = document.querySelector(`#rows tr[data-name='${name}']`);"
            "  return row !== null && Number(row.dataset.seq) > 0"
            "    && Number(row.dataset.seq) !== seq; }",
            arg=[name, seq], timeout=WAIT_MS,
        )
        return await self.seq(name)

    async def assert_clean(self) -> None:
        """No rule of the page's policy was broken, no exception went uncaught."""
        violations = await self.page.evaluate("window.__violations")
        assert violations == [], violations
        assert self.errors == [], self.errors


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    need("browser", browser_missing())
    async with async_playwright() as playwright:
        launched = await launch(playwright)
        try:
            yield launched
        finally:
            await launched.close()


async def open_dashboard(browser: Browser, port: int, path: str = "/") -> Dashboard:
    context = await browser.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    dashboard = Dashboard(page)
    page.on("pageerror", lambda error: dashboard.errors.append(str(error)))
    await page.add_init_script(WATCH_VIOLATIONS)
    await page.goto(f"http://127.0.0.1:{port}{path}")
    return dashboard


async def test_the_dashboard_shows_values_change_live(
    browser: Browser, sensors: SimulatedSensors, make_gateway: Any, closed_udp_port: int
) -> None:
    mapping = gateway_config(sensors)
    # And a sensor that is not there: nothing listens on its port.
    mapping["sensors"].append(
        {"name": "gone", "uri": f"coap://127.0.0.1:{closed_udp_port}/x", "observe": True})
    gateway: Gateway = await make_gateway(mapping)
    dash = await open_dashboard(browser, gateway.ws.port)
    await expect(dash.page.locator("#connection")).to_have_attribute("data-state", "open")
    await expect(dash.page.locator("#connection")).to_have_text("connected")
    # A row per resource of `list`: the four configured, /blob discovered.
    for name in ("temperature", "humidity", "status", "led"):
        await expect(dash.row(name)).to_have_count(1)
        await expect(dash.row(name).locator("td.uri")).to_have_text(
            f"{sensors.base_uri}/{name}")
    blob = dash.page.locator(f'#rows tr[data-uri="{sensors.base_uri}/blob"]')
    await expect(blob).to_have_count(1)
    await expect(dash.page.locator("#summary")).to_contain_text("6 resources")

    temperature = dash.row("temperature")
    await expect(temperature.locator(".state")).to_have_text("online")
    await expect(temperature.locator(".state")).to_have_attribute("data-state", "online")
    first = await dash.seq_changes("temperature", 0)
    shown = await temperature.locator("td.value").text_content()
    assert shown is not None and re.fullmatch(r"-?\d+(\.\d+)?", shown), shown
    # Live: the seq moves on, and so does the value shown (a random walk every 50 ms).
    second = await dash.seq_changes("temperature", first)
    await expect(temperature.locator("td.value")).not_to_have_text(shown)
    assert second != first
    # The sparkline draws the numbers seen; the age ticks in seconds.
    await dash.page.wait_for_function(
        "() => document.querySelector(\"#rows tr[data-name='temperature'] polyline\")"
        "  .getAttribute('points').split(' ').length >= 3", timeout=WAIT_MS)
    await expect(temperature.locator("td.age")).to_have_text(re.compile(r"^\d+ s$"))
    # SenML reads as "value unit"; text as it is.
    await expect(dash.row("humidity").locator("td.value")).to_have_text(
        re.compile(r"^\d+(\.\d+)? %RH$"))
    await expect(dash.row("status").locator("td.value")).to_have_text(re.compile(r"^ok uptime="))
    # States in words and in colour: the missing sensor is offline, and says why.
    gone = dash.row("gone").locator(".state")
    await expect(gone).to_have_text("offline")
    await expect(gone).to_have_attribute("title", re.compile("unreachable"))
    await expect(dash.page.locator("#summary")).to_contain_text("1 offline")
    colours = await dash.page.evaluate("""() => [...document.querySelectorAll(
        "#rows tr[data-name='temperature'] .state, #rows tr[data-name='gone'] .state")]
        .map((badge) => getComputedStyle(badge).color)""")
    assert len(colours) == 2 and colours[0] != colours[1], colours
    await dash.assert_clean()


async def test_pressing_the_led_button_changes_the_led(
    browser: Browser, sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway: Gateway = await make_gateway(gateway_config(sensors))
    dash = await open_dashboard(browser, gateway.ws.port)
    led = dash.row("led")
    button = led.locator("button.toggle")
    await expect(led.locator("td.value")).to_have_text('{"on":false}')
    await expect(button).to_have_text("Turn on")
    await expect(button).to_have_attribute("aria-pressed", "false")
    # Only a value with a boolean gets a button: the temperature has none.
    await expect(dash.row("temperature").locator("button")).to_have_count(0)

    await button.click()
    # The PUT's answer, then the LED's own notification, shown in its row.
    await expect(dash.page.locator("#response")).to_have_attribute("data-code", "2.04")
    await expect(dash.page.locator("#response")).to_have_attribute("data-outcome", "success")
    await expect(led.locator("td.value")).to_have_text('{"on":true}')
    await expect(button).to_have_text("Turn off")
    await expect(button).to_have_attribute("aria-pressed", "true")
    assert sensors.led_on is True

    await button.click()
    await expect(led.locator("td.value")).to_have_text('{"on":false}')
    assert sensors.led_on is False
    await dash.assert_clean()


async def test_the_request_form_sends_any_request_and_shows_the_answer(
    browser: Browser, sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway: Gateway = await make_gateway(gateway_config(sensors))
    dash = await open_dashboard(browser, gateway.ws.port)
    page = dash.page
    response = page.locator("#response")
    await expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    # Clicking a name makes it the target (and offers its value to edit).
    await dash.row("led").locator("td.name a").click()
    await expect(page.locator("#target")).to_have_value("led")
    await expect(page.locator("#value")).to_have_value('{"on":false}')

    await page.locator("#method").select_option("PUT")
    await page.locator("#value").fill('{"on": true}')
    await page.locator("#send").click()
    await expect(response).to_have_attribute("data-code", "2.04")
    await expect(dash.row("led").locator("td.value")).to_have_text('{"on":true}')

    await page.locator("#method").select_option("GET")
    await page.locator("#target").fill("status")
    await page.locator("#value").fill("")
    await page.locator("#send").click()
    await expect(response).to_have_attribute("data-code", "2.05")
    await expect(response).to_contain_text("ok uptime=")

    # Not JSON: said at once, nothing sent. A refusal: the gateway's error code and message.
    await page.locator("#method").select_option("PUT")
    await page.locator("#target").fill("led")
    await page.locator("#value").fill("{on: yes}")
    await page.locator("#send").click()
    await expect(response).to_have_attribute("data-outcome", "failure")
    await expect(response).to_contain_text("not JSON")
    await page.locator("#value").fill("")
    await page.locator("#target").fill("no/such/sensor")
    await page.locator("#send").click()
    await expect(response).to_have_attribute("data-code", "not_found")
    await dash.assert_clean()


async def test_the_page_recovers_by_itself_when_the_gateway_restarts(
    browser: Browser, sensors: SimulatedSensors
) -> None:
    mapping = gateway_config(sensors)
    gateway = Gateway(config_from_mapping(mapping))
    await gateway.start()
    try:
        # The new gateway comes back on the same port: the page knows no other address.
        mapping["server"]["port"] = gateway.ws.port
        dash = await open_dashboard(browser, gateway.ws.port)
        connection = dash.page.locator("#connection")
        await expect(connection).to_have_attribute("data-state", "open")
        await dash.seq_changes("temperature", 0)
        epoch = await dash.row("temperature").get_attribute("data-epoch")
        assert epoch

        await gateway.stop()
        await expect(connection).to_have_text(re.compile(r"^reconnecting"))
        await expect(connection).not_to_have_attribute("data-state", "open")
        await expect(dash.page.locator("body")).to_have_attribute("data-connection", "down")

        gateway = Gateway(config_from_mapping(mapping))
        await gateway.start()
        await expect(connection).to_have_attribute("data-state", "open")
        await expect(connection).to_have_text("connected")
        await expect(dash.page.locator("body")).to_have_attribute("data-connection", "up")
        # Values flow again: the restarted gateway's (a new stream: another epoch), changing.
        await expect(dash.row("temperature")).not_to_have_attribute("data-epoch", epoch)
        seq = await dash.seq(name="temperature")
        for _ in range(3):
            seq = await dash.seq_changes("temperature", seq)
        await expect(dash.row("temperature").locator(".state")).to_have_text("online")
        # And the page still drives the actuator through the new connection.
        await dash.row("led").locator("button.toggle").click()
        await expect(dash.row("led").locator("td.value")).to_have_text('{"on":true}')
        await dash.assert_clean()
    finally:
        await gateway.stop()


async def test_a_token_is_asked_for_and_kept_out_of_the_address_bar(
    browser: Browser, sensors: SimulatedSensors, make_gateway: Any
) -> None:
    mapping = gateway_config(sensors)
    mapping["auth"] = {"tokens": [{"token": TOKEN, "name": "dash", "scopes": ["read", "write"]}]}
    gateway: Gateway = await make_gateway(mapping)
    port = gateway.ws.port
    dash = await open_dashboard(browser, port)
    page = dash.page
    connection = page.locator("#connection")
    # The handshake fails; the page finds out why (401) and asks.
    await expect(page.locator("#token-form")).to_be_visible()
    await expect(connection).to_have_attribute("data-state", "token")
    await expect(page.locator("#token-message")).to_contain_text("needs a token")

    await page.locator("#token").fill("not-the-token")
    await page.locator("#token-form button").click()
    await expect(page.locator("#token-message")).to_contain_text("did not accept")
    await expect(page.locator("#token-form")).to_be_visible()

    await page.locator("#token").fill(TOKEN)
    await page.locator("#token-form button").click()
    await expect(connection).to_have_attribute("data-state", "open")
    await expect(page.locator("#token-form")).to_be_hidden()
    await dash.seq_changes("temperature", 0)
    assert page.url == f"http://127.0.0.1:{port}/"
    assert await page.evaluate("sessionStorage.getItem('coap-ws-gateway.token')") == TOKEN
    # A reload keeps the tab's token: connected again without asking.
    await page.reload()
    await expect(connection).to_have_attribute("data-state", "open")
    await expect(page.locator("#token-form")).to_be_hidden()
    # Forgetting it asks again.
    await page.locator("#forget-token").click()
    await expect(page.locator("#token-form")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('coap-ws-gateway.token')") is None
    await dash.assert_clean()

    # An old link with the token in its query: the token moves out of the address at once.
    linked = await open_dashboard(browser, port, f"/?access_token={TOKEN}&x=1#top")
    await expect(linked.page.locator("#connection")).to_have_attribute("data-state", "open")
    assert linked.page.url == f"http://127.0.0.1:{port}/?x=1#top"
    await linked.assert_clean()


MANY: Final = 200


async def test_the_table_stays_usable_with_200_resources(browser: Browser) -> None:
    # 200 configured resources on one simulated sensor (the query makes each URI its own
    # resource, with its own observation), every one updating twice a second.
    async with SimulatedSensors("127.0.0.1", 0, interval=0.5, seed=2) as sensors:
        mapping = gateway_config(sensors)
        mapping["sensors"] = [
            {"name": f"r/{i:03d}", "uri": f"{sensors.base_uri}/temperature?n={i}"}
            for i in range(MANY)
        ]
        mapping["policy"]["allow"] = []  # only those: the sensor's own listing is not reachable
        # A frame budget of 25 request units (a subscribe costs 0.5): most of the first 200
        # subscribes are refused with rate_limited, and the page must subscribe them again.
        mapping["limits"] = {"burst": 25}
        gateway = Gateway(config_from_mapping(mapping))
        await gateway.start()
        try:
            dash = await open_dashboard(browser, gateway.ws.port)
            page = dash.page
            rows = page.locator('#rows tr[data-name^="r/"]')
            await expect(rows).to_have_count(MANY)
            # Every one subscribed (some only on a later try) and showing a value.
            await page.wait_for_function(
                "(many) => document.querySelectorAll("
                "  '#rows tr[data-name^=\"r/\"][data-state=\"online\"]:not([data-seq=\"0\"])'"
                ").length === many", arg=MANY, timeout=120_000)
            await expect(page.locator("#summary")).to_have_text(
                f"{MANY} resources · {MANY} online")
            # Readable: nothing wider than the window, one line per row, and the header
            # stays in view when scrolled to the last row.
            layout = await page.evaluate("""() => {
                const heights = [...document.querySelectorAll('#rows tr')]
                    .map((tr) => Math.round(tr.getBoundingClientRect().height));
                return {overflow: document.documentElement.scrollWidth - innerWidth,
                        tallest: Math.max(...heights), lowest: Math.min(...heights)};
            }""")
            assert layout["overflow"] <= 0, layout
            assert layout["tallest"] - layout["lowest"] <= 2 and layout["tallest"] < 48, layout
            await rows.last.scroll_into_view_if_needed()
            header = await page.locator("#resources th").first.bounding_box()
            assert header is not None and 0 <= header["y"] < 100, header
            # Rows off screen are drawn when they scroll into view.
            await expect(rows.last.locator(".state")).to_have_text("online")
            await expect(rows.last.locator("td.value")).to_have_text(re.compile(r"^\d+(\.\d+)?$"))
            # Still live with all of them: the last row's seq moves on.
            last = f"r/{MANY - 1:03d}"
            await dash.seq_changes(last, await dash.seq(last))
            # The filter narrows the table to what matches.
            await page.locator("#filter").fill("r/01")
            await expect(page.locator('#rows tr[data-name^="r/"]:visible')).to_have_count(10)
            await page.locator("#filter").fill("")
            await expect(page.locator('#rows tr[data-name^="r/"]:visible')).to_have_count(MANY)
            await dash.assert_clean()
        finally:
            await gateway.stop()
