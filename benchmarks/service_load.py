"""The HTTP service under load, against `captioner caption` on the same images, same machine, same run.

    .venv/bin/python benchmarks/service_load.py --out benchmarks/RESULTS.md
    .venv/bin/python benchmarks/service_load.py --images 8 --seconds 2 --soak-s 0 --clients 1 4  # quick

On the same 640x480 JPEGs drawn here, beam size 3, attention on, one image per request:
(1) the latency of each image in-process (Predictor.caption on the file's bytes, with all the
cores' torch threads); (2) `captioner caption` on the folder, images/s (median of three runs); (3) `captioner serve` on
loopback, for each number of concurrent clients: images/s, p50/p95/p99 latency, and the memory
of the server's processes (the peak RSS of each, and PSS summed: shared pages counted once);
(4) a soak at 8 clients, memory sampled as it runs; (5) the attack of 6 requests at once of four
16-bit 6300 x 6300 PNGs each, and how much the server's memory grew. The clients are this process: asyncio over
raw sockets with keep-alive, the requests encoded once, so that they take little of the CPU the
server needs. Every answer is checked to be a 200 with one result.
"""

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.children import child_processes
from runtime.home import default_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from caption_throughput import BEAM_SIZE, cli_rate, draw_images, in_child
from results_file import describe_machine, machine, markdown_table, save_results, write_section

SECTION = "## Service under load"
BOUNDARY = "captioner-bench-boundary"
SOAK_CLIENTS = 8
SOAK_SAMPLE_S = 15.0
FLOOD_CLIENTS = 6


def form_request(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> bytes:
    """A POST /v1/captions, head and body: the option `fields`, and `files` as (name, type, bytes)."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts += [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, kind, data in files
    ]
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST /v1/captions HTTP/1.1\r\nHost: bench\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def request_bytes(path: Path, max_length: int) -> bytes:
    """The measured request: the JPEG at `path`, beam search, attention on."""
    fields = {"method": "beam", "beam_size": str(BEAM_SIZE), "attention": "true", "max_length": str(max_length)}
    return form_request(fields, [(path.name, "image/jpeg", path.read_bytes())])


def flood_request(files: int = 4, side: int = 6300) -> bytes:
    """The decompression attack: a request of `files` 16-bit grayscale PNGs of side x side (about 80 KB
    each, within every per-file limit, 10 bytes a pixel to decode)."""
    pixels = np.zeros((side, side), np.uint16)
    pixels[side // 6 : side // 3, side // 6 : side // 2] = 40000
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return form_request({"method": "greedy"}, [(f"deep{i}.png", "image/png", buffer.getvalue()) for i in range(files)])


async def flood(port: int, request: bytes, clients: int) -> float:
    """`clients` such requests at once, each on its own connection; the seconds until all are answered."""
    start = time.monotonic()

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await exchange(reader, writer, request)
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return time.monotonic() - start


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bytes:
    """Send one request on a kept-alive connection; the answer's body, checked to be a 200."""
    writer.write(request)
    status = await reader.readline()
    length = None
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError(f"an answer without Content-Length: {status!r}")
    body = await reader.readexactly(length)
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{status.decode().strip()}: {body[:300].decode(errors='replace')}")
    return body


async def client(port: int, requests: list[bytes], offset: int, until: float, latencies: list) -> None:
    """One client: requests back to back until `until` (monotonic), each (start, seconds) recorded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        i = offset
        while (start := time.monotonic()) < until:
            await exchange(reader, writer, requests[i % len(requests)])
            latencies.append((start, time.monotonic() - start))
            i += 1
    finally:
        writer.close()


async def load(port: int, requests: list[bytes], clients: int, warm_up: float, seconds: float) -> dict:
    """`clients` clients for warm_up + seconds; what finished within the measured window counts."""
    latencies: list[tuple[float, float]] = []
    begin = time.monotonic()
    window = (begin + warm_up, begin + warm_up + seconds)
    await asyncio.gather(*(client(port, requests, i * 7, window[1], latencies) for i in range(clients)))
    measured = sorted(t for start, t in latencies if start >= window[0] and start + t <= window[1])
    answered = len(latencies)
    if not measured:
        raise RuntimeError(f"no request finished within the {seconds} s window at {clients} clients")
    quantile = lambda q: 1000 * measured[min(len(measured) - 1, int(q * len(measured)))]
    return {
        "clients": clients,
        "images_per_s": len(measured) / seconds,
        "p50_ms": quantile(0.50),
        "p95_ms": quantile(0.95),
        "p99_ms": quantile(0.99),
        "requests": len(measured),
        "answered": answered,  # in the warm-up and the window: what the server's CPU time was spent on
    }


class MemoryWatch:
    """Samples memory() every `interval` seconds, in a thread. Reading PSS walks every page table
    (tens of ms of CPU for the server's processes): sample seldom, or it becomes the load."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval = pid, interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval):
            self.samples.append({"t": time.monotonic() - start, **memory(self.pid)})


def memory(pid: int) -> dict:
    """MB, for `pid` and its children: PSS summed (shared pages counted once), and each one's RSS
    now and at its highest so far (the kernel's high-water mark, VmHWM: a peak no sampling misses)."""
    pids = [pid, *child_processes(pid)]
    pss, rss, peak = [], [], []
    for p in pids:
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
            status = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:  # a child that has just ended
            continue
        pss.append(_kib(rollup, "Pss") / 1024)
        rss.append(_kib(status, "VmRSS") / 1024)
        peak.append(_kib(status, "VmHWM") / 1024)
    return {"pss_mb": sum(pss), "rss_mb": rss, "peak_rss_mb": peak, "processes": len(rss)}


def _kib(lines: list[str], field: str) -> int:
    return next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))


def cpu_seconds(pid: int) -> dict:
    """The CPU time (user + system) spent so far by the server's own process (the event loop, the form
    parsing, the hand-over to the workers, the answers' assembly) and by its children, the model workers,
    summed (a worker replaced meanwhile loses its time: none is replaced under a clean load), and by this
    process, the clients."""

    def used(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    return {
        "server": used(pid),
        "workers": sum(used(p) for p in child_processes(pid)),
        "clients": time.process_time(),
    }


def cpu_per_request(before: dict, after: dict, answered: int) -> dict:
    """ms of CPU per answered request (one image each): the server's process, its workers, and the clients
    (this process, which shares the cores with the server: the folder command has no such load)."""
    return {f"{part}_ms": 1000 * (after[part] - before[part]) / answered for part in ("server", "workers", "clients")}


def load_with_cpu(server: int, port: int, requests: list[bytes], clients: int, warm_up: float, seconds: float) -> dict:
    """load() against the server whose pid is `server`, with what each request cost in CPU ("cpu")."""
    before = cpu_seconds(server)
    result = asyncio.run(load(port, requests, clients, warm_up, seconds))
    return {**result, "cpu": cpu_per_request(before, cpu_seconds(server), result["answered"])}


def in_process_latency(checkpoint: Path, paths: list[Path], max_length: int) -> dict:
    """(1): Predictor.caption on each file's bytes once, as a request's work is, after one call to
    warm up. Over the same images as the loads: captions differ in length, and so do their times."""
    import torch

    from captioner.decoding import DecodeOptions
    from captioner.predictor import Predictor
    from runtime.cpus import available_cpus

    torch.set_num_threads(available_cpus())
    predictor = Predictor.from_checkpoint(checkpoint)
    options = DecodeOptions(beam_size=BEAM_SIZE, attention=True, max_length=max_length)
    uploads = [path.read_bytes() for path in paths]
    predictor.caption(uploads[:1], options)
    times = []
    for data in uploads:
        start = time.perf_counter()
        predictor.caption([data], options)
        times.append(time.perf_counter() - start)
    return {"p50_ms": 1000 * statistics.median(times), "threads": torch.get_num_threads()}


def folder_rate(args, folder: Path, count: int) -> dict:
    """(2), the median of --folder-rounds runs: one run takes seconds, and on a shared machine a
    few seconds can be 15% faster or slower than the next, so one run is a poor yardstick."""
    rounds = [
        in_child(cli_rate, args.checkpoint, folder, count, args.max_length, []) for _ in range(args.folder_rounds)
    ]
    rates = [r["images_per_s"] for r in rounds]
    return {"images_per_s": statistics.median(rates), "rounds": rates}


def start_server(checkpoint: Path, port: int, log: Path, flags: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--log-level", "warning", *flags], stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).close()
            return server
        except OSError:  # not listening yet, or not ready (503)
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server was not ready within 120 s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_load(args, requests: list[bytes], scratch: Path) -> dict:
    """(3) and (4) against one server process."""
    port = free_port()
    server = start_server(args.checkpoint, port, scratch / "server.log", args.server_flags)
    try:
        idle = memory(server.pid)
        loads = []
        for clients in args.clients:
            result = load_with_cpu(server.pid, port, requests, clients, args.warm_up, args.seconds)
            loads.append({**result, "memory": memory(server.pid)})  # after the step, outside its window
            print(json.dumps(loads[-1]), flush=True)
        soak = None
        if args.soak_s > 0:
            interval = min(SOAK_SAMPLE_S, args.soak_s / 4)
            with MemoryWatch(server.pid, interval) as watch:
                result = asyncio.run(load(port, requests, SOAK_CLIENTS, 0, args.soak_s))
            soak = {**result, "sample_s": interval, "samples": watch.samples}
        before = memory(server.pid)
        seconds = asyncio.run(flood(port, flood_request(side=args.flood_side), FLOOD_CLIENTS))
        attack = {"side": args.flood_side, "seconds": seconds, "before": before, "after": memory(server.pid)}
        print(json.dumps({"flood": attack}), flush=True)
    finally:
        server.terminate()
        server.wait(60)
    return {"idle": idle, "loads": loads, "soak": soak, "flood": attack}


def render(results: dict) -> str:
    setup, loads, soak = results["setup"], results["server"]["loads"], results["server"]["soak"]
    folder = results["folder"]["images_per_s"]
    in_process = results["in_process"]["p50_ms"]
    one_client = next((r["p50_ms"] for r in loads if r["clients"] == 1), None)
    rows = [
        [
            str(r["clients"]),
            f"{r['images_per_s']:.1f}",
            f"{r['images_per_s'] / folder:.2f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p95_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['cpu']['server_ms']:.1f}",
            f"{r['cpu']['workers_ms']:.0f}",
            f"{r['cpu']['clients_ms']:.1f}",
            f"{r['memory']['pss_mb']:.0f}",
            " + ".join(f"{m:.0f}" for m in r["memory"]["peak_rss_mb"]),
        ]
        for r in loads
    ]
    lines = [
        SECTION,
        "",
        f"`{results['command']}`",
        "",
        f"{describe_machine(results['machine'])}. Model: {setup['model']}. {setup['images']} images of 640 x 480, "
        f"one per request, beam size {BEAM_SIZE}, attention on, at most {setup['max_length']} words; server flags: "
        f"`{' '.join(setup['server_flags']) or 'the defaults'}`; {setup['seconds']:g} s per row after "
        f"{setup['warm_up']:g} s of warm-up.",
        "",
        f"`captioner caption` on the same images: {folder:.1f} images/s (the median of "
        + ", ".join(f"{r:.1f}" for r in results["folder"]["rounds"])
        + "). Each image once in-process "
        f"(Predictor.caption, {results['in_process']['threads']} threads): p50 {in_process:.0f} ms"
        + (f"; one client over HTTP: p50 {one_client:.0f} ms, {one_client - in_process:+.0f} ms" if one_client else "")
        + f". The idle server: {results['server']['idle']['pss_mb']:.0f} MB "
        f"(PSS, its {results['server']['idle']['processes']} processes summed).",
        "",
        *markdown_table(
            [
                "clients",
                "images/s",
                "/ `captioner caption`",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "server process CPU ms / request",
                "workers CPU ms / image",
                "clients CPU ms / request",
                "PSS MB after, summed",
                "peak RSS MB so far, each process",
            ],
            rows,
        ),
    ]
    if soak:
        pss = [s["pss_mb"] for s in soak["samples"]]
        minute = max(1, round(60 / soak["sample_s"]))
        lines += [
            "",
            f"Soak: {SOAK_CLIENTS} clients for {setup['soak_s']:g} s, {soak['images_per_s']:.1f} images/s, p99 "
            f"{soak['p99_ms']:.0f} ms. Memory (PSS summed, MB) every {soak['sample_s']:g} s: first minute "
            f"{min(pss[:minute]):.0f} to {max(pss[:minute]):.0f}, last minute {min(pss[-minute:]):.0f} to "
            f"{max(pss[-minute:]):.0f}, highest {max(pss):.0f}; peak RSS of each process "
            + " + ".join(f"{m:.0f}" for m in soak["samples"][-1]["peak_rss_mb"])
            + ".",
        ]
    attack = results["server"]["flood"]
    grown = sum(attack["after"]["peak_rss_mb"]) - sum(attack["before"]["peak_rss_mb"])
    lines += [
        "",
        f"Attack: {FLOOD_CLIENTS} requests at once of 4 16-bit grayscale PNGs of {attack['side']} x {attack['side']} "
        f"({attack['side'] ** 2 * 10 / 1e6:.0f} MB each to decode), answered in {attack['seconds']:.0f} s: "
        f"the peak RSS of the server's processes grew by {grown:.0f} MB in all; PSS "
        f"{attack['before']['pss_mb']:.0f} MB before, {attack['after']['pss_mb']:.0f} MB after.",
    ]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    parser.add_argument("--images", type=int, default=256, help="how many images to draw")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per number of clients")
    parser.add_argument("--warm-up", type=float, default=3.0, help="seconds before each measurement")
    parser.add_argument("--soak-s", type=float, default=300.0, help="seconds of the soak (0: none)")
    parser.add_argument(
        "--folder-rounds", type=int, default=3, help="captioner caption runs, their median the yardstick"
    )
    parser.add_argument("--flood-side", type=int, default=6300, help="side of the attack's 16-bit PNGs")
    parser.add_argument("--server-flags", nargs=argparse.REMAINDER, default=[], help="passed to captioner serve")
    parser.add_argument("--out", type=Path, help="write the results into this Markdown file")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no model at {args.checkpoint}: run `make model` first")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch, "images")
        folder.mkdir()
        draw_images(folder, args.images)
        paths = sorted(folder.iterdir())
        requests = [request_bytes(path, args.max_length) for path in paths]
        in_process = in_child(in_process_latency, args.checkpoint, paths, args.max_length)
        print(json.dumps({"in_process": in_process}), flush=True)
        rate = folder_rate(args, folder, len(paths))
        print(json.dumps({"folder": rate}), flush=True)
        server = serve_and_load(args, requests, Path(scratch))
    results = {
        "command": "python benchmarks/service_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "setup": {
            "model": args.checkpoint.name,
            "images": args.images,
            "max_length": args.max_length,
            "seconds": args.seconds,
            "warm_up": args.warm_up,
            "soak_s": args.soak_s,
            "server_flags": args.server_flags,
        },
        "in_process": in_process,
        "folder": rate,
        "server": server,
    }
    text = render(results)
    print(text)
    if args.out:
        save_results(args.out, "service_load", results)
        write_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
