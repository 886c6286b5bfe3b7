"""Serving load: latency of `cirlab serve` under N concurrent clients, on a large index, over loopback.

Builds (once, cached under --work) a gallery of random CSS scenes and its FAISS index with a trained
checkpoint (the demo's TIRG by default), starts the real server in a subprocess, and sends a fixed
number of composed queries from N client threads: gallery-id queries (the reference is an indexed
image) and, separately, uploaded-image queries. Reports p50/p95/p99 latency, throughput and errors, for
each index served (--indexes: the FAISS Flat index, or a copy of its vectors in Milvus, on an embedded
server this run starts, at Strong or Bounded consistency) and each --batch-wait-ms.

    make demo                                          # trains runs/demo/tirg/best
    python benchmarks/serve_load.py                    # 100K images, 1-16 clients, 400 requests per row
    python benchmarks/serve_load.py --batch-wait-ms 0 5   # without micro-batching, then with it
    python benchmarks/serve_load.py --indexes faiss milvus-strong milvus-bounded   # Milvus beside FAISS
    python benchmarks/serve_load.py --images 5000 --requests 100   # quick look
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, publish  # noqa: E402

from cirlab.data.css import COLOURS, GRID_CELLS, SHAPES, SIZES, SceneObject, render_scene  # noqa: E402
from cirlab.index.build import build_index  # noqa: E402
from cirlab.index.faiss_index import FaissIndex  # noqa: E402
from cirlab.index.milvus_embedded import embedded_milvus, free_port  # noqa: E402
from cirlab.serve.batching import BATCH_WAIT_MS  # noqa: E402

TEXTS = ("make top-left object red", "add large blue circle to middle-center", "remove the small green triangle",
         "make middle-right object large", "add small gray rectangle to bottom-left")
SERVED = {"faiss": None, "milvus-strong": "Strong", "milvus-bounded": "Bounded"}  # --indexes: consistency
INDEX_LABELS = {"faiss": "FAISS Flat", "milvus-strong": "Milvus FLAT, Strong", "milvus-bounded": "Milvus FLAT, Bounded"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/tirg/best", help="trained checkpoint (make demo)")
    parser.add_argument("--images", type=int, default=100_000, help="gallery size")
    parser.add_argument("--work", default="runs/bench-serve-load", help="gallery, index and results")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent clients per row")
    parser.add_argument("--indexes", nargs="+", choices=list(SERVED), default=["faiss"],
                        help="what is served: the FAISS Flat index, or a Milvus copy of it at a consistency level "
                             "(an embedded Milvus server is started for it)")
    parser.add_argument("--batch-wait-ms", type=float, nargs="+", default=[BATCH_WAIT_MS],
                        help=f"passed to `cirlab serve --batch-wait-ms` (default: {BATCH_WAIT_MS:g}; 0: no batching)")
    parser.add_argument("--requests", type=int, default=400, help="requests per row")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def write_gallery(folder: Path, count: int, seed: int) -> None:
    """`count` random CSS scenes (1-5 objects) as 64-px PNGs; resumes a partial folder."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for number in tqdm(range(count), desc="rendering gallery", unit="img"):
        objects = [SceneObject(cell, rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), 0, 0)
                   for cell in rng.sample(range(len(GRID_CELLS)), rng.randint(1, 5))]
        path = folder / f"{number // 1000:03d}" / f"scene_{number:07d}.png"
        if path.is_file():
            continue
        path.parent.mkdir(exist_ok=True)
        pixels = (render_scene([o.as_dict() for o in objects]) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(path)


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"the server at {url} did not come up in {timeout:.0f} s")


def multipart(fields: dict[str, str], image: bytes | None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
                     "Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_load(url: str, requests: list[tuple[bytes, str]], clients: int) -> tuple[list[float], int, float]:
    """Send every request once from `clients` threads; latencies (ms) of the successful ones."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    queue = list(reversed(requests))

    def client() -> None:
        nonlocal errors
        while True:
            with lock:
                if not queue:
                    return
                body, content_type = queue.pop()
            request = urllib.request.Request(url + "/api/search", data=body, headers={"Content-Type": content_type})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    ok = response.status == 200 and len(json.loads(response.read())["results"]) > 0
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                ok = False
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - started


def percentile(values: list[float], q: float | str) -> float:
    """The q-th percentile, or the mean for q = "mean"; NaN without values."""
    if not values:
        return float("nan")
    return statistics.mean(values) if q == "mean" else float(np.percentile(values, q))


def milvus_copy(source_folder: Path, folder: Path, uri: str) -> Path:
    """A Milvus index in `folder` holding the FAISS index's vectors (same model, gallery and checkpoint)."""
    from cirlab.index.milvus_index import MilvusIndex  # needs the extra cirlab[milvus]

    shutil.rmtree(folder, ignore_errors=True)  # its collection lived on a server that is gone
    with FaissIndex.open(source_folder) as source, MilvusIndex.create(
            folder, source.dim, source.model_id, uri, gallery_root=source.gallery_root,
            checkpoint=source.checkpoint) as copy:
        ids = source.ids()
        for start in range(0, len(ids), 50_000):
            copy.add(ids[start:start + 50_000], source.reconstruct(ids[start:start + 50_000]))
        copy.commit()
    return folder


def serve_rows(index: Path, options: list[str], by_id: list, uploads: list, clients: list[int]) -> list[tuple]:
    """(query kind, clients, latencies, errors, seconds) of every row, against `cirlab serve INDEX OPTIONS`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cirlab", "serve", str(index), "--port", str(port), *options],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_until_up(url, server)
        run_load(url, by_id[:20], 1)  # warm-up: first calls allocate buffers and fill caches
        for kind, requests in (("gallery id", by_id), ("uploaded image", uploads)):
            for count in clients:
                latencies, errors, seconds = run_load(url, requests, count)
                rows.append((kind, count, latencies, errors, seconds))
                print(f"{' '.join(options)}: {kind}, {count} clients: p50 {percentile(latencies, 50):.1f} ms, "
                      f"{len(latencies) / seconds:.1f} requests/s, errors {errors}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows


def main() -> None:
    args = parse_args()
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        sys.exit(f"no checkpoint at {checkpoint}: run `make demo` first, or pass --checkpoint")
    work = Path(args.work)
    gallery, index = work / f"gallery-{args.images}", work / f"index-{args.images}"
    write_gallery(gallery, args.images, args.seed)
    build_index(checkpoint, gallery, index)  # embeds only what is missing: a rerun is quick

    rng = random.Random(args.seed)
    ids = sorted(str(p.relative_to(gallery)) for p in gallery.rglob("*.png"))
    samples = [ids[rng.randrange(len(ids))] for _ in range(args.requests)]
    by_id = [multipart({"image_id": image, "text": rng.choice(TEXTS), "k": str(args.k)}, None)
             for image in samples]
    uploads = [multipart({"text": rng.choice(TEXTS), "k": str(args.k)}, (gallery / image).read_bytes())
               for image in samples]

    rows = []
    with ExitStack() as stack:
        milvus_index = None
        for served in args.indexes:
            level = SERVED[served]
            if level is not None and milvus_index is None:
                shutil.rmtree(work / "milvus-server", ignore_errors=True)  # an interrupted run's: start empty
                uri = stack.enter_context(embedded_milvus(work / "milvus-server", work / "milvus-bin"))
                milvus_index = milvus_copy(index, work / f"index-{args.images}-milvus", uri)
            for wait in args.batch_wait_ms:
                options = ["--batch-wait-ms", f"{wait:g}"] + (["--milvus-consistency", level] if level else [])
                rows += [(served, wait, *row) for row in serve_rows(milvus_index if level else index, options,
                                                                   by_id, uploads, args.clients)]

    lines = [f"Serving load: `cirlab serve` on a {args.images:,}-image index ({checkpoint}), "
             f"{args.requests} requests per row, k={args.k}, loopback HTTP", "",
             "| index | batching | query | clients | p50 ms | p95 ms | p99 ms | mean ms | requests/s | errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for served, wait, kind, clients, latencies, errors, seconds in rows:
        cells = [percentile(latencies, q) for q in (50, 95, 99)] + [percentile(latencies, "mean")]
        batching = f"wait {wait:g} ms" if wait else "off"
        lines.append(f"| {INDEX_LABELS[served]} | {batching} | {kind} | {clients} | "
                     + " | ".join(f"{c:.1f}" for c in cells) + f" | {len(latencies) / seconds:.1f} | {errors} |")
    lines += ["", "FAISS Flat: exact, in the server's process; Milvus: the same vectors in an exact FLAT collection "
              "of an embedded server on this machine (cirlab.index.milvus_embedded), at the consistency named",
              f"machine: {describe_machine()}", f"command: {command_line()}"]
    publish(work, "\n".join(lines), {"rows": [{"index": served, "batch_wait_ms": wait, "query": kind,
                                                "clients": clients, "latencies_ms": latencies, "errors": errors,
                                                "seconds": seconds}
                                               for served, wait, kind, clients, latencies, errors, seconds in rows],
                                      "args": vars(args)})


if __name__ == "__main__":
    main()
