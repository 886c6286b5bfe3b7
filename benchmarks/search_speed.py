"""Search speed: FAISS exact, IVF and HNSW against a NumPy brute force, on galleries of 10K to 1M vectors.

Vectors are unit-length (cosine = inner product, as in a cirlab index), D = 512, drawn from a Gaussian
mixture with a few thousand centres (real embeddings cluster; i.i.d. Gaussian vectors are all nearly
orthogonal and make approximate search look unrealistically hard or easy). The centres themselves are
drawn around a few dozen topics, so a point's neighbours beyond its own cluster come from related
clusters, not from random directions, as with real embeddings. Queries come from the same mixture.
With --checkpoint and --images the gallery is also the real target embeddings of an image folder
(indexed with cirlab's own build), queried with a random sample of its own vectors.

Per gallery: build time, memory (the index as written to disk; the array for NumPy), batched QPS,
single-query latency (p50, p99), recall@10 of each approximate index against exact search, and the
setting reached: IVF with nlist ~ 4 sqrt(N), nprobe doubled until recall@10 >= --target on separate
tuning queries; HNSW with M = 32, efSearch doubled likewise. The machine's SGEMM GFLOP/s (a large
float32 matmul in NumPy and in torch) is printed with the fraction that batched exact search reaches.

Method `milvus` (not run by default; needs the extra `cirlab[milvus]`) measures cirlab's Milvus backend,
MilvusIndex, against an embedded Milvus server that this run starts on this machine under --out (one server
for the whole run, talked to over loopback): build = create, add in chunks of 50,000, commit; then the same
measurements, once with the index opened at Strong consistency and once at Bounded. Its memory column is
the raw vectors (N x D x 4 bytes), not the server's own footprint.

    python benchmarks/search_speed.py                           # 10K, 100K and 1M (about 6 GiB of RAM at 1M)
    python benchmarks/search_speed.py --sizes 10000 --queries 200 --latency-queries 50    # quick look
    python benchmarks/search_speed.py --sizes 1000000 --methods hnsw                      # one method
    python benchmarks/search_speed.py --sizes 100000 --methods flat milvus                # Milvus against FAISS

Models ranked in two stages (CMAP) need a checkpoint and its query states: benchmarks/two_stage.py measures
them, at 100K and 1M, with the same columns where they apply.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, publish  # noqa: E402

from cirlab.devices import resolve_device  # noqa: E402
from cirlab.index.build import build_index  # noqa: E402
from cirlab.index.milvus_embedded import embedded_milvus  # noqa: E402

METHODS = ("numpy", "flat", "ivf", "hnsw", "milvus")
DEFAULT_METHODS = ["numpy", "flat", "ivf", "hnsw"]  # milvus starts a server: only when asked for
MILVUS_ADD_CHUNK = 50_000
MILVUS_GRACEFUL_S = 5.0  # the server's default gracefulTime: how far a Bounded search may lag the writes
Search = Callable[[np.ndarray, int], np.ndarray]  # queries, k -> B x k gallery rows


@dataclass
class Row:
    gallery: str
    method: str
    setting: str
    build_s: float
    memory_mib: float
    batched_qps: float
    p50_ms: float
    p99_ms: float
    recall_at_10: float
    gflops: float | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                        help="synthetic gallery sizes (none: only the real gallery)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--centres", type=int, default=2000, help="Gaussian mixture components")
    parser.add_argument("--topics", type=int, default=50, help="groups of related centres")
    parser.add_argument("--spread", type=float, default=0.5,
                        help="noise norm relative to the centre norm (0.5: same-cluster cosine ~0.8)")
    parser.add_argument("--queries", type=int, default=1000, help="batched queries (and as many for tuning)")
    parser.add_argument("--latency-queries", type=int, default=200, help="queries sent one at a time")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95, help="recall@k that nprobe/efSearch are tuned to")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=DEFAULT_METHODS)
    parser.add_argument("--checkpoint", help="also a real gallery: this checkpoint's embeddings of --images")
    parser.add_argument("--images", help="image folder for --checkpoint")
    parser.add_argument("--gemm-size", type=int, default=4096, help="n of the n x n SGEMM that measures the peak")
    parser.add_argument("--out", default="runs/bench-search-speed", help="results.md and results.json go here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if bool(args.checkpoint) != bool(args.images):
        parser.error("--checkpoint and --images go together")
    if not args.sizes and not args.checkpoint:
        parser.error("nothing to measure: give --sizes or --checkpoint with --images")
    return args


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def mixture(count: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """`count` unit vectors, each a random one of the unit `centres` plus isotropic noise of norm ~ `spread`
    (in chunks: 1M x 512 float32 is 2 GiB and the noise must not double it)."""
    out = np.empty((count, centres.shape[1]), dtype=np.float32)
    scale = np.float32(spread / math.sqrt(centres.shape[1]))
    for start in range(0, count, 100_000):
        stop = min(start + 100_000, count)
        noise = rng.standard_normal((stop - start, centres.shape[1]), dtype=np.float32) * scale
        out[start:stop] = _unit(centres[rng.integers(len(centres), size=stop - start)] + noise)
    return out


def sgemm_gflops(n: int) -> dict[str, float]:
    """Best of 3 n x n float32 matmuls: NumPy (its BLAS), torch on the CPU, and torch on CUDA when present."""
    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    results = {"numpy": flops / _best_time(lambda: a @ b) / 1e9}
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    results["torch cpu"] = flops / _best_time(lambda: ta @ tb) / 1e9
    if torch.cuda.is_available():
        ca, cb = ta.cuda(), tb.cuda()
        results["torch cuda"] = flops / _best_time(lambda: (ca @ cb, torch.cuda.synchronize())) / 1e9
    return results


def _best_time(run: Callable[[], object], repeats: int = 3) -> float:
    run()  # warm-up: thread pools, allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def numpy_search(gallery: np.ndarray) -> Search:
    """Brute force in query chunks of at most ~256 MiB of scores; the top k by argpartition, then sorted."""
    def search(queries: np.ndarray, k: int) -> np.ndarray:
        chunk = max(1, (64 << 20) // len(gallery))
        results = []
        for start in range(0, len(queries), chunk):
            scores = queries[start:start + chunk] @ gallery.T
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
            results.append(np.take_along_axis(top, order, axis=1))
        return np.concatenate(results)
    return search


def faiss_search(index: faiss.Index) -> Search:
    return lambda queries, k: index.search(queries, k)[1]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top k that `found` also returned."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact, strict=True)]))


def index_mib(index: faiss.Index) -> float:
    """The index as cirlab would store it on disk (written to a temp file, never held twice in memory)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.faiss"
        faiss.write_index(index, str(path))
        return path.stat().st_size / 2**20


def tune(search: Search, set_knob: Callable[[int], None], tuning: np.ndarray, exact: np.ndarray, k: int,
         target: float, start: int, limit: int) -> int:
    """The first of start, 2 start, 4 start, ... (up to `limit`) whose recall@k on the tuning queries reaches
    `target`."""
    value = start
    while True:
        set_knob(value)
        if recall(search(tuning, k), exact) >= target or value >= limit:
            return value
        value *= 2


def measure(name: str, method: str, setting: str, build_s: float, memory: float, search: Search,
            queries: np.ndarray, latency: np.ndarray, exact: np.ndarray, k: int, flops: float | None) -> Row:
    started = time.perf_counter()
    found = search(queries, k)
    batched = time.perf_counter() - started
    times = []
    for query in latency:
        started = time.perf_counter()
        search(query[None], k)
        times.append(time.perf_counter() - started)
    p50, p99 = np.percentile(np.array(times) * 1000, [50, 99])
    return Row(name, method, setting, round(build_s, 2), round(memory, 1), round(len(queries) / batched, 1),
               round(float(p50), 3), round(float(p99), 3), round(recall(found, exact), 4),
               None if flops is None else round(flops / batched / 1e9, 1))


@contextmanager
def milvus_server(out: Path) -> Iterator[str]:
    """An embedded Milvus server for the whole run, its data under out/milvus-server and its binaries unpacked
    once into out/milvus-bin; the data folder is removed after a run that succeeded, kept with its logs
    after one that failed."""
    base = out / "milvus-server"
    shutil.rmtree(base, ignore_errors=True)  # a failed run's: every run starts a server with no data
    with embedded_milvus(base, out / "milvus-bin") as uri:
        yield uri
    shutil.rmtree(base)


def bench_milvus(name: str, gallery: np.ndarray, queries: np.ndarray, latency: np.ndarray, exact: np.ndarray,
                 k: int, uri: str, out: Path) -> list[Row]:
    """MilvusIndex (a FLAT collection) built from `gallery`, measured at Strong and at Bounded consistency;
    its collection and index folder are removed afterwards."""
    from pymilvus import MilvusClient

    from cirlab.index.milvus_index import MilvusIndex

    ids = [str(row) for row in range(len(gallery))]  # row numbers, so that hits compare with `exact`
    rows = []
    with tempfile.TemporaryDirectory(dir=out, prefix="milvus-index-") as folder:
        started = time.perf_counter()
        with MilvusIndex.create(Path(folder), gallery.shape[1], "search-speed", uri) as index:
            collection = index.info()["collection"]
            try:
                for start in range(0, len(gallery), MILVUS_ADD_CHUNK):
                    index.add(ids[start:start + MILVUS_ADD_CHUNK], gallery[start:start + MILVUS_ADD_CHUNK])
                index.commit()
                committed = time.perf_counter()
                build = committed - started
                for level in ("Strong", "Bounded"):
                    if level == "Bounded":  # measured on settled writes, not on the last seconds' it may miss
                        time.sleep(max(0.0, committed + MILVUS_GRACEFUL_S - time.perf_counter()))
                    with MilvusIndex.open(Path(folder), consistency=level) as opened:
                        def search(batch: np.ndarray, top: int, opened: MilvusIndex = opened) -> np.ndarray:
                            return np.array(opened.search(batch, top)[1], dtype=np.int64)
                        rows.append(measure(name, "milvus (embedded)", f"FLAT, {level} consistency", build,
                                            gallery.nbytes / 2**20, search, queries, latency, exact, k, None))
            finally:
                client = MilvusClient(uri=uri)
                try:
                    client.drop_collection(collection)
                finally:
                    client.close()
    return rows


def bench_gallery(name: str, gallery: np.ndarray, queries: np.ndarray, tuning: np.ndarray, latency: np.ndarray,
                  args: argparse.Namespace, milvus_uri: str | None) -> list[Row]:
    count, dim = gallery.shape
    k = args.k
    started = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(gallery)
    flat_build = time.perf_counter() - started
    exact, exact_tuning = flat.search(queries, k)[1], flat.search(tuning, k)[1]
    flops = 2.0 * len(queries) * count * dim
    rows = []
    if "numpy" in args.methods:
        rows.append(measure(name, "numpy brute force", "float32 matmul", 0.0, gallery.nbytes / 2**20,
                            numpy_search(gallery), queries, latency, exact, k, flops))
    if "flat" in args.methods:
        rows.append(measure(name, "faiss IndexFlatIP", "exact", flat_build, index_mib(flat), faiss_search(flat),
                            queries, latency, exact, k, flops))
    del flat
    if "ivf" in args.methods:
        nlist = max(1, round(4 * math.sqrt(count)))
        started = time.perf_counter()
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # FAISS asks for 39 to 256 training points per list; more only slows k-means down.
        sample = np.random.default_rng(args.seed).choice(count, size=min(count, 64 * nlist), replace=False)
        ivf.train(gallery[np.sort(sample)])
        ivf.add(gallery)
        build = time.perf_counter() - started
        nprobe = tune(faiss_search(ivf), lambda v: setattr(ivf, "nprobe", v), tuning, exact_tuning, k,
                      args.target, 1, nlist)
        rows.append(measure(name, "faiss IVF,Flat", f"nlist {nlist}, nprobe {nprobe}", build, index_mib(ivf),
                            faiss_search(ivf), queries, latency, exact, k, None))
        del ivf
    if "hnsw" in args.methods:
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(gallery)
        build = time.perf_counter() - started
        # efSearch is the beam width: below k the search cannot return k results.
        ef = tune(faiss_search(hnsw), lambda v: setattr(hnsw.hnsw, "efSearch", v), tuning, exact_tuning, k,
                  args.target, 1 << (k - 1).bit_length(), 4096)
        rows.append(measure(name, "faiss HNSW32,Flat", f"efConstruction 40, efSearch {ef}", build,
                            index_mib(hnsw), faiss_search(hnsw), queries, latency, exact, k, None))
        del hnsw
    if milvus_uri is not None:
        rows += bench_milvus(name, gallery, queries, latency, exact, k, milvus_uri, Path(args.out))
    return rows


def real_gallery(args: argparse.Namespace, work: Path) -> np.ndarray:
    """The checkpoint's unit-length target vectors of every image of --images, via cirlab's own index build."""
    index = build_index(Path(args.checkpoint), Path(args.images), work / "real-index", device=resolve_device("auto"))
    with index:
        return index.reconstruct(index.ids())


def table(rows: list[Row], peak: dict[str, float], args: argparse.Namespace) -> str:
    best = max(peak["numpy"], peak["torch cpu"])
    lines = [f"Search speed (k = {args.k}; recall@{args.k} against exact search; latency = one query per call)",
             "", "| gallery | method | setting | build s | memory MiB | batched QPS | p50 ms | p99 ms "
                 f"| recall@{args.k} | GFLOP/s (of CPU SGEMM) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        gflops = "" if row.gflops is None else f"{row.gflops:.1f} ({row.gflops / best:.0%})"
        lines.append(f"| {row.gallery} | {row.method} | {row.setting} | {row.build_s:.2f} | {row.memory_mib:.1f} "
                     f"| {row.batched_qps:,.0f} | {row.p50_ms:.3f} | {row.p99_ms:.3f} | {row.recall_at_10:.3f} "
                     f"| {gflops} |")
    lines += ["", f"SGEMM ({args.gemm_size}^3, float32): " + ", ".join(f"{name} {value:.1f} GFLOP/s"
                                                                     for name, value in peak.items()),
              f"batched = {args.queries} queries in one call; FAISS threads: {faiss.omp_get_max_threads()}"]
    if "milvus" in args.methods:
        lines.append("milvus: an embedded server on this machine, over loopback; build = create + add + commit; "
                     "memory = the raw vectors (N x D x 4 bytes), not the server's footprint (hard to get)")
    if args.sizes:
        lines.append(f"synthetic galleries: Gaussian mixture of {args.centres} centres in {args.topics} topics, "
                     f"spread {args.spread}, D = {args.dim}")
    lines += [f"machine: {describe_machine()}", f"command: {command_line()}"]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = sgemm_gflops(args.gemm_size)
    print("SGEMM GFLOP/s: " + ", ".join(f"{name} {value:.1f}" for name, value in peak.items()), flush=True)
    rng = np.random.default_rng(args.seed)
    rows: list[Row] = []
    with milvus_server(out) if "milvus" in args.methods else nullcontext() as milvus_uri:
        if args.sizes:
            topics = _unit(rng.standard_normal((args.topics, args.dim), dtype=np.float32))
            centres = mixture(args.centres, topics, 1.0, rng)  # same-topic centres: cosine ~0.5
            queries = mixture(args.queries, centres, args.spread, rng)
            tuning = mixture(args.queries, centres, args.spread, rng)
            latency = mixture(args.latency_queries, centres, args.spread, rng)
            for size in args.sizes:
                gallery = mixture(size, centres, args.spread, rng)
                measured = bench_gallery(f"synthetic {size:,}", gallery, queries, tuning, latency, args, milvus_uri)
                rows += measured
                del gallery
                print("\n".join(f"{row}" for row in measured), flush=True)
        if args.checkpoint:
            gallery = real_gallery(args, out)
            picks = rng.permutation(len(gallery))
            needed = 2 * args.queries + args.latency_queries
            if len(gallery) < needed:
                raise SystemExit(f"{args.images}: {len(gallery)} images, fewer than the {needed} queries asked for")
            queries, tuning, latency = np.split(gallery[picks[:needed]], [args.queries, 2 * args.queries])
            rows += bench_gallery(f"{Path(args.images).name} ({len(gallery):,}, D {gallery.shape[1]})", gallery,
                                  queries, tuning, latency, args, milvus_uri)
    publish(out, table(rows, peak, args), {"rows": [asdict(row) for row in rows], "sgemm_gflops": peak,
                                           "args": vars(args)})


if __name__ == "__main__":
    main()
