"""Headless-browser screenshots of a run's report and of its MLflow run page, for ``docs/img/``.

    python -m analysis.screenshots --report runs/demo-report/report.html --run-dir runs/demo --out docs/img

What it does: a headless Chromium (``chromium``/``chromium-browser``/``google-chrome`` on PATH) renders the
report's HTML file; then ``mlflow ui`` is started on 127.0.0.1 at a free port against the run's tracking
store (the URI in ``<run_dir>/mlflow_run.json``), the browser renders the run's overview page and its
model-metrics tab (filtered to the validation metrics), and the server is stopped. The report is a static
page, shot with a virtual-time budget; the MLflow UI is a JavaScript app whose charts only finish in real
time, so it is driven over Chromium's DevTools protocol. Nothing here imports Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# MLflow 3.17's UI shows either its GenAI or its model-training navigation, chosen by a global switch kept in
# the browser (default GenAI) or by this URL parameter; the experiment's mlflow.experimentKind tag is what
# older MLflow 3 UIs read. A fresh headless browser needs the parameter.
ML_WORKFLOW = "machine_learning"


def find_browser() -> str:
    """The first headless-capable Chromium on PATH.

    Raises:
        FileNotFoundError: none of ``BROWSERS`` is installed.
    """
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(f"no Chromium on PATH (looked for {list(BROWSERS)}); install one, e.g. apt-get install chromium")


def screenshot(url: str, out: Path, *, width: int = 1400, height: int = 1800, budget_ms: int = 20000) -> Path:
    """Render ``url`` headless into the PNG ``out`` (``budget_ms`` of virtual time for scripts to settle)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
           f"--screenshot={out.resolve()}", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    if not out.is_file():
        raise RuntimeError(f"{cmd[0]} wrote no screenshot of {url} (exit {done.returncode}): {done.stderr[-800:]}")
    log.info("screenshot %s -> %s", url, out)
    return out


# Run in the MLflow page before its shot: close the assistant side panel (MLflow 3 opens it on a first
# visit, over the charts) with its own Close button, the one next to its "New Chat" button; and filter
# the model-metrics charts to the validation metrics (val/mean_ppl first), the headline of a run.
CLOSE_ASSISTANT = """(() => { for (let n = document.querySelector('button[aria-label="New Chat"]'); n; n = n.parentElement) {
    const close = n.querySelector('button[aria-label="Close"]'); if (close) { close.click(); return true; } }
  return false; })()"""
FILTER_CHARTS = """(() => { const i = document.querySelector('input[placeholder="Search metric charts"]');
  if (!i) return false;
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, '%s');
  i.dispatchEvent(new Event('input', {bubbles: true})); return true; })()"""


def live_screenshot(url: str, out: Path, *, width: int = 1400, height: int = 1600, settle_s: float = 15.0,
                    scripts: tuple[str, ...] = ()) -> Path:
    """Render ``url`` in headless Chromium driven over the DevTools protocol, in real time: ``settle_s``
    seconds for the page's requests and charts, then each of ``scripts`` (with ``settle_s / 2`` after
    each), then the shot. A script that returns ``false`` (it found nothing to act on) is logged as a
    warning. MLflow's metric charts never finish under ``--virtual-time-budget``, which ``screenshot``
    uses. Uses aiohttp (installed with Ray) for the websocket.
    """
    import asyncio
    import base64

    import aiohttp

    async def shoot(port: int) -> bytes:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.put(f"http://127.0.0.1:{port}/json/new") as resp:
                        target = await resp.json(content_type=None)
                    break
                except aiohttp.ClientError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1000))

                async def call(method: str, **params: object) -> dict:
                    msg_id = next(ids)
                    await ws.send_json({"id": msg_id, "method": method, "params": params})
                    async for msg in ws:
                        data = msg.json()
                        if data.get("id") == msg_id:
                            return data.get("result", {})
                    raise RuntimeError(f"the browser closed the DevTools connection during {method}")

                await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                           mobile=False)
                await call("Page.navigate", url=url)  # not in /json/new's query: the '#' route would be cut
                await asyncio.sleep(settle_s)
                for script in scripts:
                    done = await call("Runtime.evaluate", expression=script, returnByValue=True)
                    if done.get("result", {}).get("value") is False:
                        log.warning("%s: the page script found nothing to act on: %s", url, script[:80])
                    await asyncio.sleep(settle_s / 2)
                shot = await call("Page.captureScreenshot", format="png")
                return base64.b64decode(shot["data"])

    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    browser = subprocess.Popen([find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                                f"--window-size={width},{height}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        png = asyncio.run(shoot(port))
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            browser.kill()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(png)
    tmp.replace(out)
    log.info("screenshot %s -> %s", url, out)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlflow_command() -> str:
    """The ``mlflow`` script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "mlflow"
    return str(local) if local.is_file() else "mlflow"


def mlflow_pages(run_dir: Path, out_dir: Path, *, startup_s: float = 120.0) -> list[Path]:
    """Screenshots of the MLflow run of ``run_dir``: its overview and its model-metrics tab.

    Raises:
        FileNotFoundError: ``<run_dir>/mlflow_run.json`` is missing (the run was not tracked).
        TimeoutError: the MLflow UI did not answer ``/health`` within ``startup_s``.
    """
    record = Path(run_dir) / "mlflow_run.json"
    if not record.is_file():
        raise FileNotFoundError(f"{record} does not exist: was the run tracked (tracking.enabled)?")
    info = json.loads(record.read_text())
    uri, run_id = info["tracking_uri"], info["run_id"]
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    port = free_port()
    server = subprocess.Popen([_mlflow_command(), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"mlflow ui on {base} did not start (exit {server.poll()})")
            time.sleep(0.5)
        page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        view = f"?workflowType={ML_WORKFLOW}"
        return [live_screenshot(page + view, out_dir / "mlflow_run.png", height=1400, scripts=(CLOSE_ASSISTANT,)),
                live_screenshot(page + "/model-metrics" + view, out_dir / "mlflow_run_metrics.png", height=1400,
                                scripts=(CLOSE_ASSISTANT, FILTER_CHARTS % "val/"))]
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--report`` HTML and/or ``--run-dir`` (its MLflow run) into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, help="a report.html from `acodm report`")
    parser.add_argument("--run-dir", type=Path, help="a tracked run directory (holds mlflow_run.json)")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.report is None and args.run_dir is None:
        parser.error("give --report, --run-dir or both")
    if args.report is not None:
        if not args.report.is_file():
            parser.error(f"--report {args.report}: no such file")
        screenshot(args.report.resolve().as_uri(), args.out / "report.png", width=1300, height=5200, budget_ms=3000)
    if args.run_dir is not None:
        mlflow_pages(args.run_dir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
