"""A screenshot of a trainer's run page: log in, wait for a run's charts, save a PNG.

    .venv/bin/python scripts/screenshot_run_page.py URL TOKEN OUT.png [--run ID] [--steps N]

URL is the page (``http://127.0.0.1:8000/``); TOKEN ``-`` reads the token from
``HAPO_API_TOKEN`` (out of the process list). The page shows the newest live run unless
``--run`` names one; the shot is taken once its charts hold ``--steps`` steps (default 1).
Headless Chromium is Debian's (``CHROMIUM_PATH``, else ``chromium`` on the PATH:
scripts/install-chromium.sh), driven by playwright, which downloads no browser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from playwright.sync_api import Error, sync_playwright


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("token", help="the API token, or - to read HAPO_API_TOKEN")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--run", help="the run to show (default: the newest live one)")
    parser.add_argument("--steps", type=int, default=1, help="steps to wait for (default 1)")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    token = os.environ.get("HAPO_API_TOKEN", "") if args.token == "-" else args.token
    chromium = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium")
    if not chromium:
        print("chromium not found: run scripts/install-chromium.sh", file=sys.stderr)
        return 2
    timeout_ms = args.timeout_s * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(timeout_ms)
            page.goto(args.url)
            page.fill("#token", token)
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#dashboard:not([hidden]), #login-error:not(:empty)")
            if refused := page.locator("#login-error").inner_text():
                print(f"not logged in: {refused}", file=sys.stderr)
                return 1
            if args.run:
                page.click(f'#runs li[data-run-id="{args.run}"]')
            deadline = time.monotonic() + args.timeout_s
            while int(page.locator("#charts").get_attribute("data-steps") or 0) < args.steps:
                if time.monotonic() > deadline:
                    print(f"no screenshot: fewer than {args.steps} steps", file=sys.stderr)
                    return 1
                page.wait_for_timeout(250)
            page.screenshot(path=args.out, full_page=True)
        except Error as exc:
            print(f"no screenshot: {exc}", file=sys.stderr)
            return 1
        finally:
            browser.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
