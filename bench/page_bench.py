"""The search page on the demo catalogue: first-load weight and the browser's search round trip
against the API's own `POST /search` time.

What `make run` serves, in a temporary DATA_DIR: `python -m service.demo` (demo encoder, 10k
Fashion-MNIST test images), then `python -m service` as its own process. Headless Chromium (Debian
`chromium` + `chromium-driver`, Selenium) opens the page with a fresh profile; each round searches
one new query image (Fashion-MNIST training images, not in the catalogue) through the page's file
input, timed from the request to the first rows' thumbnails decoded and in the page, and to their
paint (Element Timing, from the file's choice: the frame that shows them), and another new image
through the API (httpx, loopback: the same request as the page's, the PNG as the body, k=24),
interleaved so both see the same load. The file is chosen by the page's own script (a `File` put
in the input, then its `change` event), in the one WebDriver command that waits for the result:
with `send_keys` on the input, chromedriver's own work ran on the browser's CPU inside the timed
window (~5 ms of ~30, measured). Goal (issue 12): first load under
200 KB, browser round trip within 2x the API's. Also counted: thumbnail requests the page made
before its results showed (0 when the search answers with the thumbnails inline). The timed rounds
start once the service says its search caches are warm (`caches_warm` in /health/ready: records and
thumbnails read in the background after start-up), as for anyone who searches a running service;
the cache lookups that still went to the database during the rounds are counted (/metrics).

    python bench/page_bench.py                 # appends to bench/RESULTS.md
    python bench/page_bench.py --count 2000 --rounds 20 --no-append
    python bench/page_bench.py --data-dir /tmp/demo-10k   # build once, measure again and again
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "service"))

from browser_helpers import chromium, transferred, wait_for  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from bench.search_bench import append_results, machine, percentile, wait_ready  # noqa: E402
from service.embedded_db import free_port  # noqa: E402
from tests.service.service_helpers import fashion_mnist, png_bytes  # noqa: E402

SECTION = "## Search page (bench/page_bench.py)"
CACHE_COUNT = re.compile(r'^cache_(hits|misses)\{cache="(\w+)"\} ([0-9.e+]+)$', re.M)
STAGE = re.compile(r"(decode|embed|search|metadata|thumbnails) (\d+)")
K = 24  # the page's default
PNG_BODY = {"Content-Type": "image/png"}  # the API side sends the image as the body, as the page does

# Resolves when the page shows a result set newer than the one on screen now and the first rows'
# thumbnails were painted (Element Timing: the page marks them `elementtiming="thumbnail"`), or 2 s
# after that without their paint (then `painted` is null).
ARM = r"""
const list = document.getElementById('results');
const before = Number(list.dataset.seq || 0);
performance.clearResourceTimings();  // its buffer holds 250 entries
const armed = performance.now();
const painted = [];  // ms from `armed` to each first-rows thumbnail's first paint
const paints = new PerformanceObserver(entries => {
  for (const e of entries.getEntries()) {
    if (e.identifier === 'thumbnail' && e.renderTime >= armed) painted.push(e.renderTime - armed);
  }
});
paints.observe({type: 'element'});
window.__benchResult = new Promise(resolve => {
  const observer = new MutationObserver(() => {
    if (Number(list.dataset.seq) <= before) return;
    observer.disconnect();
    const thumbnails = performance.getEntriesByType('resource')
      .filter(e => e.startTime >= armed && /\/images\/\d+\/thumbnail/.test(e.name)).length;
    const search = performance.getEntriesByType('resource')
      .find(e => e.startTime >= armed && new URL(e.name).pathname === '/search');
    const timing = name => search?.serverTiming.find(t => t.name === name)?.duration ?? 0;
    const result = {chosenToFetch: search ? search.startTime - armed : null,
                    wire: search ? [search.requestStart - search.startTime,
                                    search.responseStart - search.requestStart,
                                    search.responseEnd - search.responseStart] : [0, 0, 0],
                    serverTiming: [timing('body'), timing('app')],
                    shown: Number(list.dataset.shownMs), answered: Number(list.dataset.answeredMs),
                    rendered: Number(list.dataset.renderedMs),
                    server: Number(list.dataset.serverMs), count: list.children.length, thumbnails,
                    timing: document.getElementById('timing').textContent};
    const expected = Math.min(12, list.children.length);
    const until = performance.now() + 2000;  // PAINT_WAIT_MS
    const painting = () => {
      if (painted.length < expected && performance.now() < until) return void setTimeout(painting, 5);
      paints.disconnect();
      resolve({...result, painted: painted.length >= expected ? Math.max(...painted) : null});
    };
    painting();
  });
  observer.observe(list, {attributes: true, attributeFilter: ['data-seq']});
});
"""
COLLECT = "window.__benchResult.then(arguments[arguments.length - 1]);"
# Chooses arguments[0] = [name, base64 PNG] in the page's file input, as a person's choice arrives
# (the input's `change` event), then resolves with the ARMed result: one WebDriver command a round.
CHOOSE_AND_COLLECT = (
    ARM
    + r"""
const [name, base64] = arguments[0];
const bytes = Uint8Array.from(atob(base64), c => c.charCodeAt(0));
const chosen = new DataTransfer();
chosen.items.add(new File([bytes], name, {type: 'image/png'}));
const input = document.getElementById('query-file');
input.files = chosen.files;
input.dispatchEvent(new Event('change', {bubbles: true}));
"""
    + COLLECT
)

# The floor under any page, in the same browser: a bare document on the service's origin that does
# only the irreducible part of a search (the same request as the page's, its JSON, the first 12
# inline thumbnails put in as plain <img>) and resolves when Element Timing reports their paint.
BARE_ROUND = r"""
const [base64, done] = [arguments[0], arguments[arguments.length - 1]];
const bytes = Uint8Array.from(atob(base64), c => c.charCodeAt(0));
const box = document.getElementById('bare');
const armed = performance.now();
const painted = [];
const paints = new PerformanceObserver(entries => {
  for (const e of entries.getEntries()) {
    if (e.identifier === 'bare' && e.renderTime >= armed) painted.push(e.renderTime - armed);
  }
});
paints.observe({type: 'element'});
const body = {method: 'POST', body: bytes, headers: {'Content-Type': 'image/png'}};
fetch('/search?k={k}&thumbnails={k}', body)
  .then(reply => reply.json()).then(data => {
    const answered = performance.now() - armed;
    box.replaceChildren(...data.results.slice(0, 12).map(r => {
      const img = new Image(112, 112);
      img.setAttribute('elementtiming', 'bare');
      img.src = r.thumbnail_data_url;
      return img;
    }));
    const inserted = performance.now() - armed;
    const until = performance.now() + 2000;
    const painting = () => {
      if (painted.length < 12 && performance.now() < until) return void setTimeout(painting, 5);
      paints.disconnect();
      done({answered, inserted, painted: painted.length >= 12 ? Math.max(...painted) : null});
    };
    painting();
  });
""".replace("{k}", str(K))
BARE_DOCUMENT = "document.body.replaceChildren(Object.assign(document.createElement('div'), {id: 'bare'}));"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="demo catalogue size (default 10000)")
    parser.add_argument("--rounds", type=int, default=30, help="queries timed both ways (default 30)")
    parser.add_argument("--no-append", action="store_true", help="print only, do not write RESULTS.md")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="DATA_DIR to use and keep (the demo catalogue is built there when empty); default: a "
        "temporary one",
    )
    parser.add_argument("--label", default="", help="a note for the heading of the results block")
    parser.add_argument(
        "--split-cpus",
        action="store_true",
        help="the service (and its database) on CPU 0, this client (Chromium, httpx) on the others, "
        "as a browser on its own machine would be; both sides of the ratio are measured so",
    )
    return parser.parse_args(argv)


def split_cpus() -> tuple[set[int], set[int]]:
    """(server CPUs, client CPUs): CPU 0 for the service, the rest for this process and its children."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--split-cpus needs at least 2 CPUs")
    server, client = {cpus[0]}, set(cpus[1:])
    os.sched_setaffinity(0, client)  # chromedriver and Chromium inherit it
    return server, client


def run_demo(data_dir: Path, count: int) -> float:
    env = dict(os.environ, DATA_DIR=str(data_dir), PYTHONPATH=str(REPO))
    env.pop("MONGO_URI", None)  # the embedded database under DATA_DIR/db, as `make run`
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "service.demo", "--count", str(count)], env=env, cwd=REPO, check=True
    )
    return time.perf_counter() - started


def query_files(workdir: Path, first: int, count: int) -> list[Path]:
    """Fashion-MNIST training images (never in the demo catalogue) as PNG files."""
    images, _, _ = fashion_mnist("train")
    paths = []
    for i in range(first, first + count):
        path = workdir / f"query-{i}.png"
        path.write_bytes(png_bytes(images[i]))
        paths.append(path)
    return paths


def stage_times(timing_text: str) -> dict[str, float]:
    """The service's stage times from the page's timing line ("... server 40 ms (decode 3 · ...)")."""
    return {name: float(ms) for name, ms in STAGE.findall(timing_text.partition("server")[2])}


def server_timing_of(header: str) -> list[float]:
    """[body, app] durations (ms) from a Server-Timing header."""
    found = dict(re.findall(r"(\w+);dur=([0-9.]+)", header))
    return [float(found.get("body", 0)), float(found.get("app", 0))]


def wait_warm(url: str, timeout_s: float = 900) -> float:
    """Seconds until /health/ready says the search caches are warm."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        reply = httpx.get(f"{url}/health/ready", timeout=30)
        if reply.status_code == 200 and reply.json().get("caches_warm"):
            return time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit(f"the search caches were not warm after {timeout_s:.0f} s")


def cache_counts(url: str) -> dict[str, float]:
    """{"records hits": n, "thumbnails misses": n, ...} from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {f"{cache} {kind}": float(n) for kind, cache, n in CACHE_COUNT.findall(text)}


def measure(url: str, rounds: int, workdir: Path) -> dict:
    # Two sets of new images, so that neither side searches an image the other just searched (the
    # second search of an image would find its results' records in the service's memory).
    page_queries = query_files(workdir, 0, rounds + 1)
    api_queries = query_files(workdir, rounds + 1, rounds + 1)
    with chromium() as driver, httpx.Client(base_url=url, timeout=60) as client:
        driver.set_script_timeout(60)
        driver.get(url + "/")
        wait_for(driver, lambda d: d.find_element(By.ID, "status-text").text == "ready", "ready", 60)
        entries = transferred(driver)
        first_load = sum(e["transfer"] for e in entries)
        counts_before = cache_counts(url)
        browser, answered, rendered, server, api, thumbnail_requests = [], [], [], [], [], []
        painted: list[float | None] = []
        chosen: list[float] = []  # the file's choice to the search request's start
        browser_stages, api_stages, wire, server_timing, api_server_timing = [], [], [], [], []
        for i, (path, api_path) in enumerate(zip(page_queries, api_queries, strict=True)):
            png = base64.b64encode(path.read_bytes()).decode("ascii")
            result = driver.execute_async_script(CHOOSE_AND_COLLECT, [path.name, png])
            # the page classifies after searching: let that finish before the next timed search
            wait_for(
                driver,
                lambda d: d.find_element(By.ID, "classify").get_attribute("aria-busy") == "false",
                "classify",
                60,
            )
            api_png = api_path.read_bytes()
            started = time.perf_counter()
            reply = client.post("/search", content=api_png, headers=PNG_BODY, params={"k": K})
            elapsed = (time.perf_counter() - started) * 1000
            reply.raise_for_status()
            if i == 0:
                continue  # warm-up: first model call, first connection
            assert result["count"] == K, result
            thumbnail_requests.append(result["thumbnails"])
            browser.append(result["shown"])
            painted.append(result["painted"])
            chosen.append(result["chosenToFetch"])
            answered.append(result["answered"])
            rendered.append(result["rendered"])
            server.append(result["server"])
            browser_stages.append(stage_times(result["timing"]))
            wire.append(result["wire"])
            server_timing.append(result["serverTiming"])
            api_server_timing.append(server_timing_of(reply.headers.get("server-timing", "")))
            api.append(elapsed)
            api_stages.append(reply.json()["timing_ms"])
        counts = cache_counts(url)
        bare = bare_rounds(driver, client, url, workdir, first=2 * (rounds + 1), rounds=rounds)
    return {
        "cache_counts": {name: counts[name] - counts_before.get(name, 0.0) for name in sorted(counts)},
        "first_load": first_load,
        "requests": len(entries),
        "browser": browser,
        "painted": painted,
        "chosen": chosen,
        "answered": answered,
        "rendered": rendered,
        "server": server,
        "api": api,
        "thumbnail_requests": thumbnail_requests,
        "browser_stages": browser_stages,
        "api_stages": api_stages,
        "wire": wire,
        "server_timing": server_timing,
        "api_server_timing": api_server_timing,
        "bare": bare,
    }


def bare_rounds(driver, client: httpx.Client, url: str, workdir: Path, first: int, rounds: int) -> dict:
    """BARE_ROUND in a bare document on the service's origin, each round beside an API search of
    another new image (the same load for both); the first round is a warm-up."""
    page_queries = query_files(workdir, first, rounds + 1)
    api_queries = query_files(workdir, first + rounds + 1, rounds + 1)
    driver.get(url + "/health/ready")  # any document of the origin: its body is replaced
    driver.execute_script(BARE_DOCUMENT)
    answered, inserted, painted, api = [], [], [], []
    for i, (path, api_path) in enumerate(zip(page_queries, api_queries, strict=True)):
        png = base64.b64encode(path.read_bytes()).decode("ascii")
        result = driver.execute_async_script(BARE_ROUND, png)
        started = time.perf_counter()
        reply = client.post("/search", content=api_path.read_bytes(), headers=PNG_BODY, params={"k": K})
        reply.raise_for_status()
        elapsed = (time.perf_counter() - started) * 1000
        if i == 0:
            continue
        answered.append(result["answered"])
        inserted.append(result["inserted"])
        painted.append(result["painted"])
        api.append(elapsed)
    return {"answered": answered, "inserted": inserted, "painted": painted, "api": api}


def median_stages(rows: list[dict[str, float]]) -> str:
    names = [name for name in ("decode", "embed", "search", "metadata", "thumbnails") if name in rows[0]]
    return ", ".join(f"{name} {statistics.median(row.get(name, 0.0) for row in rows):.0f}" for name in names)


def report(args: argparse.Namespace, m: dict, demo_s: float, warm_s: float) -> str:
    def stats(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} / {percentile(values, 90):.1f}"

    ratio = statistics.median(m["browser"]) / statistics.median(m["api"])
    paints = [ms for ms in m["painted"] if ms is not None]
    painted_ratio = statistics.median(paints) / statistics.median(m["api"]) if paints else float("nan")
    queued, waiting, download = (list(column) for column in zip(*m["wire"], strict=True))
    body, app = (list(column) for column in zip(*m["server_timing"], strict=True))
    api_body, api_app = (list(column) for column in zip(*m["api_server_timing"], strict=True))
    built = "built by an earlier run" if args.data_dir else f"`service.demo` took {demo_s:.0f} s"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"### {now}{' ' + args.label if args.label else ''}",
            "",
            f"- machine: {machine()}; Chromium headless (fresh profile), loopback HTTP",
            f"- command: `python bench/page_bench.py --count {args.count} --rounds {args.rounds}"
            + (
                " --split-cpus` (service and database on CPU 0, Chromium and httpx on the rest)"
                if args.split_cpus
                else "`"
            )
            + (" with `--data-dir` (the catalogue built by an earlier run)" if args.data_dir else ""),
            f"- catalogue: the demo's ({args.count} Fashion-MNIST test images, demo encoder, embedded "
            f"SecantusDB; {built}); k={K}; each round a new query image for each side",
            f"- search caches warm {warm_s:.0f} s after the service was ready; cache lookups during "
            f"the rounds (both sides, searches and classifications): "
            + ", ".join(f"{name} {n:.0f}" for name, n in m["cache_counts"].items()),
            f"- first load (document, CSS, JS, icon, /ui/config, /health/ready): "
            f"**{m['first_load'] / 1024:.1f} KB** in {m['requests']} requests (goal < 200 KB)",
            "",
            f"| {len(m['api'])} searches | median / p90 ms |",
            "|---|---:|",
            f"| browser: request to the first rows' thumbnails decoded, in the page "
            f"| {stats(m['browser'])} |",
            f"| browser: the file's choice to those thumbnails painted (Element Timing; {len(paints)} of "
            f"{len(m['painted'])} rounds reported a paint) | {stats(paints) if paints else 'n/a'} |",
            f"| browser: the file's choice to the search request's start | {stats(m['chosen'])} |",
            f"| browser: request to JSON answered | {stats(m['answered'])} |",
            f"| browser: request to result cards in the DOM | {stats(m['rendered'])} |",
            f"| the service's own stage times for the browser's requests | {stats(m['server'])} |",
            f"| browser's POST /search (Resource Timing): start to request sent | {stats(queued)} |",
            f"| ... request sent to first byte of the answer | {stats(waiting)} |",
            f"| ... first to last byte of the answer | {stats(download)} |",
            f"| ... in the service (Server-Timing): headers to the last byte of the body | {stats(body)} |",
            f"| ... in the service: headers to the answer's start | {stats(app)} |",
            f"| API: POST /search over HTTP (httpx) | {stats(m['api'])} |",
            f"| ... in the service: headers to the last byte of the body | {stats(api_body)} |",
            f"| ... in the service: headers to the answer's start | {stats(api_app)} |",
            "",
            f"Service stage medians, ms: browser's requests {median_stages(m['browser_stages'])}; "
            f"API's {median_stages(m['api_stages'])}",
            "",
            f"Thumbnail requests started and finished before the results showed, per search: median "
            f"{statistics.median(m['thumbnail_requests']):.0f}, max {max(m['thumbnail_requests'])}",
            "",
            f"Browser round trip / API POST /search (medians): **{ratio:.2f}x** (goal <= 2x); to the "
            f"paint: {painted_ratio:.2f}x",
            "",
            *bare_report(m["bare"], stats),
        ]
    )


def bare_report(bare: dict, stats) -> list[str]:
    """The floor: a bare document that only fetches and shows 12 thumbnails, against the API."""
    paints = [ms for ms in bare["painted"] if ms is not None]
    api = statistics.median(bare["api"])
    floor = f"{statistics.median(paints) / api:.2f}x" if paints else "n/a"
    return [
        f"The floor under any page (a bare document on the service's origin: the same request, its "
        f"JSON, the first 12 inline thumbnails put in as plain `<img>`, nothing else; "
        f"{len(bare['api'])} rounds after the page's):",
        "",
        "| bare document | median / p90 ms |",
        "|---|---:|",
        f"| request to JSON answered | {stats(bare['answered'])} |",
        f"| request to the 12 images in the document | {stats(bare['inserted'])} |",
        f"| request to the 12 images painted (Element Timing; {len(paints)} of {len(bare['painted'])} "
        f"rounds reported a paint) | {stats(paints) if paints else 'n/a'} |",
        f"| API: POST /search over HTTP (httpx), the same rounds | {stats(bare['api'])} |",
        "",
        f"Bare document to the paint / API POST /search (medians): **{floor}**",
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="page-bench-")))
        else:
            data_dir = args.data_dir
            data_dir.mkdir(parents=True, exist_ok=True)
        demo_s = run_demo(data_dir, args.count)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, DATA_DIR=str(data_dir), PYTHONPATH=str(REPO))
        env.pop("MONGO_URI", None)
        command = [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"]
        server_cpus = split_cpus()[0] if args.split_cpus else None
        process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus)) if server_cpus else None,
        )
        try:
            wait_ready(url, process, timeout_s=600)  # a busy shared machine is slow to load a model
            warm_s = wait_warm(url)
            measured = measure(url, args.rounds, data_dir)
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:  # report what was measured all the same
                print(f"the service (pid {process.pid}) did not stop within 60 s: killed", file=sys.stderr)
                process.kill()
                process.wait(60)
    block = report(args, measured, demo_s, warm_s)
    print("\n" + block)
    if not args.no_append:
        append_results(block, SECTION)


if __name__ == "__main__":
    main()
