"""Two-stage search for models with their own per-pair score: how much a shortlist loses, and what it costs.

Quality (--checkpoints): each checkpoint's own benchmark, read from its config (the garments' FashionIQ val
for the garments recipes). For every evaluation set, the gallery is indexed with cirlab's own build (the
first stage a FAISS Flat or --factories index), and every query is searched as `cirlab search` does: with
a shortlist of the whole gallery (exact ranking, the reference) and with each --shortlists size. Reported:
recall@k of the shortlisted search against exact ranking, and milliseconds per query. A model whose vectors
score exactly (OFFSET) has no shortlist: its rows measure the first stage's factory alone.

Scale (--scale-checkpoint, --sizes): latency, throughput, recall against exact, build time and memory of a
two-stage index of N images whose target features are synthetic, of the checkpoint's shapes (L levels x d):
each a real gallery image's features with noise added to every level (SPREAD), so the catalogue keeps the
real images' distribution, searched with the real query states of the checkpoint's evaluation queries.
Memory: the first stage's FAISS file, the features file on disk (mapped, never read whole by a shortlisted
search) and the rows one search copies out of it.

    python benchmarks/generator_quality.py --datasets garments --models cmap --seeds 0 --iterations 1000 \\
        --out runs/bench-garments-cmap                                    # the garments CMAP checkpoint
    python benchmarks/two_stage.py --checkpoints runs/bench-garments-cmap/garments/cmap-seed0/best
    python benchmarks/two_stage.py --scale-checkpoint runs/bench-garments-cmap/garments/cmap-seed0/best \\
        --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, publish  # noqa: E402

from cirlab.checkpoint import load_checkpoint  # noqa: E402
from cirlab.data.benchmarks import load_benchmark  # noqa: E402
from cirlab.data.evalsets import EvalSet  # noqa: E402
from cirlab.images import image_tensor, load_image  # noqa: E402
from cirlab.index.base import Index  # noqa: E402
from cirlab.index.build import build_index, model_identity  # noqa: E402
from cirlab.index.faiss_index import FaissIndex  # noqa: E402
from cirlab.index.search import SearchQuery, overlap_recall, search_states  # noqa: E402
from cirlab.models.base import CIRModel  # noqa: E402

QUERY_BATCH = 64  # queries per search_many call: one encoder pass each
NPROBE = 16  # lists an IVF first stage visits per query at scale
SPREAD = 0.5  # noise norm of a synthetic image's level features, against their unit real centre


@dataclass
class QualityRow:
    model: str
    evalset: str
    gallery: int
    queries: int
    factory: str
    shortlist: str
    recall: float
    ms_per_query: float


@dataclass
class ScaleRow:
    model: str
    images: int
    factory: str
    shortlist: int
    build_s: float
    faiss_mib: float
    features_mib: float
    search_mib: float
    batched_qps: float
    p50_ms: float
    p99_ms: float
    recall: float
    recall_queries: int


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="*", default=[], help="quality rows: trained checkpoints")
    parser.add_argument("--factories", nargs="+", default=["Flat", "HNSW32"], help="first stages of the quality rows")
    parser.add_argument("--shortlists", type=int, nargs="+", default=[10, 20, 50, 100, 200, 500])
    parser.add_argument("--scale-checkpoint", help="scale rows: the checkpoint whose shapes and queries are used")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--scale-shortlists", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--scale-factories", nargs="+", default=["Flat", "auto"],
                        help="first stages of the scale rows (auto: IVF with nlist ~ sqrt(N), nprobe NPROBE)")
    parser.add_argument("--scale-queries", type=int, default=200, help="queries for throughput and latency")
    parser.add_argument("--recall-queries", type=int, default=50, help="of those, queries also ranked exactly")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--work", default="runs/bench-two-stage", help="indexes and results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.checkpoints and not args.scale_checkpoint:
        parser.error("nothing to measure: give --checkpoints and/or --scale-checkpoint")
    return args


def _queries(evalset: EvalSet, k: int) -> list[SearchQuery]:
    return [SearchQuery(load_image(evalset.image_paths[query.reference]), query.text, k, exclude_reference=False)
            for query in evalset.queries]


def _search_all(index: Index, model: CIRModel, states: torch.Tensor, queries: list[SearchQuery],
                shortlist: int) -> tuple[list, float]:
    """Every query's hits from its encoded state, QUERY_BATCH at a time, and the milliseconds per query the
    search took (the encoder pass, the same for every shortlist, is left out)."""
    started = time.perf_counter()
    hits = []
    for start in range(0, len(queries), QUERY_BATCH):
        hits += search_states(index, model, states[start:start + QUERY_BATCH], queries[start:start + QUERY_BATCH],
                              shortlist)
    return hits, (time.perf_counter() - started) * 1000 / len(queries)


def _gallery_folder(evalset: EvalSet, folder: Path) -> Path:
    """The evaluation set's gallery as links in one folder, for cirlab's own index build (named with their
    files' suffixes, which FashionIQ's image ids lack)."""
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in evalset.gallery:
        path = evalset.image_paths[image_id]
        link = folder / (image_id if image_id.endswith(path.suffix) else image_id + path.suffix)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return folder


def quality_rows(checkpoint: Path, args: argparse.Namespace, work: Path) -> list[QualityRow]:
    loaded = load_checkpoint(checkpoint)
    model, name = loaded.model.eval(), loaded.config.model.name
    rows = []
    for evalset in load_benchmark(loaded.config).evalsets:
        gallery = _gallery_folder(evalset, work / "galleries" / f"{evalset.benchmark}-{evalset.split}")
        states, queries = _query_states(model, evalset, len(evalset.queries), args.k)
        reference, reference_ms = None, 0.0
        for factory in ["Flat", *[f for f in args.factories if f != "Flat"]]:  # Flat first: the reference
            folder = work / "indexes" / f"{name}-{model_identity(checkpoint)}-{evalset.benchmark}-{factory}"
            with build_index(checkpoint, gallery, folder, factory=factory, progress=False) as index:
                if reference is None:  # exact: every image scored (a shortlist of the gallery), or Flat vectors
                    reference, reference_ms = _search_all(index, model, states, queries, len(index))
                sizes = [len(index)] if model.vectors_score_exactly else [*args.shortlists, len(index)]
                for shortlist in sizes:
                    found, ms = ((reference, reference_ms) if (factory, shortlist) == ("Flat", len(index))
                                 else _search_all(index, model, states, queries, shortlist))
                    label = ("-" if model.vectors_score_exactly else
                             f"all ({shortlist:,})" if shortlist == len(index) else f"{shortlist}")
                    rows.append(QualityRow(name, f"{evalset.benchmark} {evalset.split}", len(index), len(queries),
                                           factory, label, round(overlap_recall(reference, found), 4), round(ms, 2)))
                    print(rows[-1], flush=True)
    return rows


def _query_states(model: CIRModel, evalset: EvalSet, count: int, k: int) -> tuple[torch.Tensor, list[SearchQuery]]:
    """The real query states of the first `count` evaluation queries."""
    queries = _queries(evalset, k)[:count]
    states = []
    with torch.no_grad():
        for start in range(0, len(queries), QUERY_BATCH):
            part = queries[start:start + QUERY_BATCH]
            pixels = torch.stack([image_tensor(query.reference, model.preprocessing) for query in part])
            states.append(model.encode_queries(pixels, [query.text for query in part]).float())
    return torch.cat(states), queries


def _real_targets(model: CIRModel, evalset: EvalSet) -> np.ndarray:
    """The model's target features (N x L x d) of the evaluation set's gallery: the centres synthetic images
    are drawn around."""
    features = []
    with torch.no_grad():
        for start in range(0, len(evalset.gallery), QUERY_BATCH):
            names = evalset.gallery[start:start + QUERY_BATCH]
            pixels = torch.stack([image_tensor(load_image(evalset.image_paths[name]), model.preprocessing)
                                  for name in names])
            features.append(model.encode_targets(pixels).float())
    return torch.cat(features).numpy()


def _synthetic_features(centres: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` target features, each a random real one with every level moved by isotropic noise of norm
    SPREAD and renormalised: a catalogue of near variants of the real images, in their distribution."""
    picked = centres[rng.integers(len(centres), size=count)]
    noise = rng.standard_normal(picked.shape, dtype=np.float32) * np.float32(SPREAD / math.sqrt(picked.shape[-1]))
    moved = picked + noise
    return moved / np.linalg.norm(moved, axis=-1, keepdims=True)


def _synthetic_index(model: CIRModel, folder: Path, count: int, centres: np.ndarray, factory: str,
                     rng: np.random.Generator) -> tuple[FaissIndex, float]:
    """A two-stage index of `count` synthetic images (`_synthetic_features`), built through FaissIndex."""
    shutil.rmtree(folder, ignore_errors=True)
    width = centres.shape[1] * centres.shape[2]
    started = time.perf_counter()
    index = FaissIndex.create(folder, width, "synthetic", factory=factory, feature_dim=width)
    chunk = 50_000
    for start in tqdm(range(0, count, chunk), desc=f"synthetic {count:,}, {factory}", unit="chunk"):
        size = min(chunk, count - start)
        features = _synthetic_features(centres, size, rng)
        with torch.no_grad():
            vectors = model.index_vectors(torch.from_numpy(features)).numpy()
        index.add([f"s{number:07d}" for number in range(start, start + size)], vectors, features.reshape(size, -1))
    index.commit()
    return index, time.perf_counter() - started


def _ivf_factory(count: int) -> str:
    return f"IVF{max(1, round(math.sqrt(count)))},Flat"


def scale_rows(checkpoint: Path, args: argparse.Namespace, work: Path) -> list[ScaleRow]:
    loaded = load_checkpoint(checkpoint)
    model, name = loaded.model.eval(), loaded.config.model.name
    if model.vectors_score_exactly:
        raise SystemExit(f"{checkpoint}: {name} ranks by its vectors alone; search_speed.py measures that")
    evalset = load_benchmark(loaded.config).evalsets[0]
    states, queries = _query_states(model, evalset, args.scale_queries, args.k)
    centres = _real_targets(model, evalset)
    levels, dim = centres.shape[1:]
    rng = np.random.default_rng(args.seed)
    rows = []
    for count in args.sizes:
        for factory in (_ivf_factory(count) if f == "auto" else f for f in args.scale_factories):
            index, build_s = _synthetic_index(model, work / "synthetic", count, centres, factory, rng)
            with index:
                rows += _measure_scale(index, model, name, states, queries, factory, build_s, args)
            shutil.rmtree(work / "synthetic", ignore_errors=True)
    return rows


def _measure_scale(index: FaissIndex, model: CIRModel, name: str, states: torch.Tensor, queries: list[SearchQuery],
                   factory: str, build_s: float, args: argparse.Namespace) -> list[ScaleRow]:
    if factory.startswith("IVF"):
        index.set_search_parameters(f"nprobe={NPROBE}")
    faiss_mib = sum(p.stat().st_size for p in index.folder.glob("vectors-*.faiss")) / 2**20
    checked = min(args.recall_queries, len(queries))
    exact = [search_states(index, model, states[i:i + 1], queries[i:i + 1], len(index))[0]
             for i in tqdm(range(checked), desc="exact ranking", unit="query")]
    rows = []
    for shortlist in args.scale_shortlists:
        started = time.perf_counter()
        found = search_states(index, model, states, queries, shortlist)
        batched_qps = len(queries) / (time.perf_counter() - started)
        times = []
        for i in range(len(queries)):
            started = time.perf_counter()
            search_states(index, model, states[i:i + 1], queries[i:i + 1], shortlist)
            times.append((time.perf_counter() - started) * 1000)
        p50, p99 = np.percentile(times, [50, 99])
        setting = f"{factory}, nprobe {NPROBE}" if factory.startswith("IVF") else factory
        rows.append(ScaleRow(name, len(index), setting, shortlist, round(build_s, 1), round(faiss_mib, 1),
                             round(index.info()["feature_bytes"] / 2**20, 1),
                             round(shortlist * index.feature_dim * 4 / 2**20, 2), round(batched_qps, 1),
                             round(float(p50), 2), round(float(p99), 2),
                             round(overlap_recall(exact, found[:checked]), 4), checked))
        print(rows[-1], flush=True)
    return rows


def table(quality: list[QualityRow], scale: list[ScaleRow], args: argparse.Namespace) -> str:
    lines = []
    if quality:
        lines += [f"Two-stage search quality: recall@{args.k} against exact ranking (a shortlist of the whole "
                  "gallery), on each checkpoint's own evaluation queries", "",
                  "| model | evaluation set | gallery | queries | first stage | shortlist | "
                  f"recall@{args.k} | ms/query |", "|---|---|---:|---:|---|---:|---:|---:|"]
        lines += [f"| {r.model} | {r.evalset} | {r.gallery:,} | {r.queries:,} | {r.factory} | {r.shortlist} | "
                  f"{r.recall:.3f} | {r.ms_per_query:.2f} |" for r in quality]
        lines.append(f"checkpoints: {', '.join(args.checkpoints)}; ms/query: the search of encoded queries, "
                     f"{QUERY_BATCH} at a time (the encoder pass, the same for every row, left out)")
    if scale:
        lines += ["" if lines else "", f"Two-stage search at scale: synthetic target features of {scale[0].model}'s "
                  f"shapes, its real query states ({args.scale_checkpoint})", "",
                  "| images | first stage | shortlist | build s | FAISS MiB | features MiB (disk) | rows read "
                  f"per query MiB | batched QPS | p50 ms | p99 ms | recall@{args.k} (queries) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.images:,} | {r.factory} | {r.shortlist} | {r.build_s:.1f} | {r.faiss_mib:,.1f} | "
                  f"{r.features_mib:,.1f} | {r.search_mib:.2f} | {r.batched_qps:,.1f} | {r.p50_ms:.2f} | "
                  f"{r.p99_ms:.2f} | {r.recall:.3f} ({r.recall_queries}) |" for r in scale]
        lines.append(f"batched = {args.scale_queries} queries in one call; peak resident memory of the process "
                     f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    lines += [f"machine: {describe_machine()}", f"command: {command_line()}"]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    quality = [row for checkpoint in args.checkpoints for row in quality_rows(Path(checkpoint), args, work)]
    scale = scale_rows(Path(args.scale_checkpoint), args, work) if args.scale_checkpoint else []
    publish(work, table(quality, scale, args), {"quality": [asdict(row) for row in quality],
                                                "scale": [asdict(row) for row in scale], "args": vars(args)})


if __name__ == "__main__":
    main()
