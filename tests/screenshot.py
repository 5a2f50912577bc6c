"""`make screenshot`: the README's picture of the demo's dashboard (docs/dashboard.png).

    python -m tests.screenshot [OUTPUT.png]

Runs `coap-ws-gateway demo --port 0` (with this interpreter), opens its page in headless
Chromium (tests/browser.py: Playwright and the system's Chromium), waits until the
sparklines hold SPARK_VALUES values, turns the LED on with its button, makes the LED the
request form's target, and takes the page. Exit status 2 when the browser part is missing,
1 when the demo or the page does not come up within WAIT seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Final

from tests.browser import browser_missing, launch

WAIT: Final = 120.0
SPARK_VALUES: Final = 30
"""Values per sparkline before the picture (the demo's sensors change once a second)."""
DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


async def demo_url(process: asyncio.subprocess.Process) -> str:
    """The page's URL, from the demo's `open http://... in a browser` line."""
    assert process.stdout is not None
    while line := (await process.stdout.readline()).decode():
        if line.startswith("open "):
            return line.split()[1]
    raise RuntimeError("the demo ended without printing its page's URL")


async def take(output: Path) -> None:
    from playwright.async_api import async_playwright, expect

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "translator", "demo", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(WAIT):
            url = await demo_url(process)
            async with async_playwright() as playwright:
                browser = await launch(playwright)
                page = await browser.new_page(
                    viewport={"width": 1200, "height": 400}, device_scale_factor=2
                )
                page.set_default_timeout(WAIT * 1000)
                expect.set_options(timeout=WAIT * 1000)
                await page.goto(url)
                temperature = page.locator('#rows tr[data-name="demo/temperature"]')
                await page.wait_for_function(
                    "(values) => Number(document.querySelector("
                    "  '#rows tr[data-name=\"demo/temperature\"]')?.dataset.points) >= values",
                    arg=SPARK_VALUES, timeout=WAIT * 1000,
                )
                led = page.locator('#rows tr[data-name="demo/led"]')
                await led.locator("button.toggle").click()
                await expect(led.locator("td.value")).to_have_text('{"on":true}')
                await led.locator("td.name a").click()
                await page.locator("#method").select_option("PUT")
                await expect(page.locator("#response")).to_have_attribute("data-code", "2.04")
                await expect(temperature.locator(".state")).to_have_text("online")
                await page.locator("#target").blur()
                await page.evaluate("window.scrollTo(0, 0)")
                await page.mouse.move(700, 12)  # onto the bar: no link or field hovered
                output.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(output), full_page=True)
                await browser.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()


def main(argv: list[str]) -> int:
    missing = browser_missing()
    if missing is not None:
        print(f"screenshot: needs a browser: {missing}", file=sys.stderr)
        return 2
    output = Path(argv[0]) if argv else DEFAULT_OUTPUT
    try:
        asyncio.run(take(output))
    except (TimeoutError, RuntimeError) as exc:
        print(f"screenshot: failed: {exc or 'timed out'}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
