"""The `cirlab` command. Every argument is parsed here and nowhere else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cirlab.config import ConfigError

if TYPE_CHECKING:  # imported lazily at run time: `cirlab --help` must not load torch
    from PIL import Image

    from cirlab.models.base import CIRModel

EPILOG = "Settings: --set section.key=value (repeatable), e.g. --set train.iterations=2000 --set model.name=concat"


def _add_search_settings(parser: argparse.ArgumentParser) -> None:
    """The index search settings `search` and `serve` share."""
    parser.add_argument("--shortlist", metavar="N", type=int, default=None,
                        help="for a model ranked in two stages (CMAP): images the index shortlists for exact "
                             "scoring (default: 200; at least the index's size: every image scored exactly)")
    parser.add_argument("--milvus-consistency", metavar="LEVEL",
                        help="a Milvus index's search consistency: Strong (default: sees every acknowledged write), "
                             "Bounded (may miss the last seconds' writes), Session or Eventually")
    parser.add_argument("--faiss-params", metavar="PARAMS",
                        help='search settings of an approximate FAISS index, e.g. "nprobe=16" (IVF) or '
                             '"efSearch=64" (HNSW); FAISS defaults otherwise (nprobe 1)')


def _require_text(text: str) -> None:
    if not text.strip():
        raise ValueError("the modification text is empty")


def _cmd_make_css(args: argparse.Namespace) -> None:
    from cirlab.data.css import generate_css

    out = generate_css(Path(args.out), preset=args.preset, seed=args.seed, image_size=args.image_size,
                       families=args.families, with_3d=args.with_3d)
    print(f"wrote CSS ({args.preset}, seed {args.seed}{', with 3D renders' if args.with_3d else ''}) to {out}")


def _cmd_make_cirr(args: argparse.Namespace) -> None:
    from cirlab.data.cirr_scenes import generate_cirr

    out = generate_cirr(Path(args.out), preset=args.preset, seed=args.seed, image_size=args.image_size)
    print(f"wrote synthetic CIRR ({args.preset}, seed {args.seed}) to {out}")


def _cmd_make_circo(args: argparse.Namespace) -> None:
    from cirlab.data.circo_scenes import generate_circo

    out = generate_circo(Path(args.out), preset=args.preset, seed=args.seed, image_size=args.image_size)
    print(f"wrote synthetic CIRCO ({args.preset}, seed {args.seed}) to {out}")


def _cmd_make_garments(args: argparse.Namespace) -> None:
    from cirlab.data.garments import generate_garments

    out = generate_garments(Path(args.out), preset=args.preset, seed=args.seed, image_size=args.image_size,
                            layout=args.layout, families=args.families)
    layouts = "fashioniq + fashion200k layouts" if args.layout == "both" else f"{args.layout} layout"
    print(f"wrote synthetic garments ({args.preset}, seed {args.seed}, {layouts}) to {out}")


def _cmd_check(args: argparse.Namespace) -> int:
    from cirlab.dataset_check import check_dataset, kept_counts

    problems = check_dataset(Path(args.root), args.format)
    for problem in problems:
        print(problem)
    counts = kept_counts(Path(args.root), args.format)
    if counts:
        print("with data.missing_images=skip, training and evaluation would keep:")
        for line in counts:
            print(f"  {line}")
    print(f"{args.root}: {len(problems)} problem(s) found ({args.format} format)")
    return 1 if problems else 0


def _cmd_masks(args: argparse.Namespace) -> None:
    from cirlab.devices import resolve_device
    from cirlab.masks.build import build_masks
    from cirlab.masks.sources import create_mask_source

    source = create_mask_source(args.source, args.weights, args.prompt, args.captions, resolve_device(args.device))
    built = build_masks(Path(args.root), source, overwrite=args.overwrite)
    print(f"{built.computed} {args.source} mask(s) computed, {built.cached} already cached, in {built.folder}")
    print(built.iou.describe() if built.iou else "no ground-truth masks (DATA/masks/) to score them against")


def _cmd_train(args: argparse.Namespace) -> None:
    from cirlab.config import load_config
    from cirlab.distributed import process_group
    from cirlab.train import train

    config = load_config(args.config, args.set)
    with process_group(config.train.device) as ctx:  # several processes under torchrun, else one
        result = train(config, Path(args.out), resume=args.resume, overwrite=args.overwrite, ctx=ctx)
    if ctx.is_main:
        best = {metric: round(value, 2) for metric, value in result.best_val.items()}
        chosen = f"best validation {json.dumps(best)}" if best else "the last checkpoint (no validation)"
        print(f"{chosen}; checkpoint: {result.run_dir / 'best'}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from cirlab.evaluate import evaluate_checkpoint, write_result, write_submission

    if args.submission:
        for path in write_submission(Path(args.checkpoint), Path(args.submission), args.set):
            print(f"wrote {path}")
        return
    result = evaluate_checkpoint(Path(args.checkpoint), args.set, explain_queries=args.explain_queries,
                                 explain_method=args.explain_method)
    # another benchmark than the training one (--set data.format=circo) gets its own name, not the split's alone
    other_benchmark = any(o.split("=", 1)[0].strip() == "data.format" for o in args.set)
    name = f"eval-{result['benchmark']}-{result['split']}" if other_benchmark else f"eval-{result['split']}"
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / name
    table, (json_path, markdown_path) = write_result(result, out)
    print(table)
    print(f"wrote {json_path} and {markdown_path}")


def _cmd_index_build(args: argparse.Namespace) -> None:
    from cirlab.distributed import process_group
    from cirlab.index.build import build_index

    with process_group(args.device) as ctx:  # under torchrun the ranks share the embedding, rank 0 writes
        index = build_index(Path(args.checkpoint), Path(args.image_dir), Path(args.out), batch_size=args.batch_size,
                            factory=args.factory, device=ctx.device, ctx=ctx, backend=args.backend,
                            milvus_uri=args.milvus_uri, collection=args.collection)
    if index is not None:
        with index:
            info = index.info()
            print(f"{args.out}: {len(index)} images indexed ({info['backend']}, {info['factory']})")


def _cmd_index_add(args: argparse.Namespace) -> None:
    from cirlab.index.build import build_index, open_index, recorded_checkpoint

    with open_index(Path(args.index)) as index:
        before, gallery = len(index), index.gallery_root
    if gallery is None:
        raise ValueError(f"{args.index}: the index records no gallery folder to add images from")
    checkpoint = Path(args.checkpoint) if args.checkpoint else recorded_checkpoint(Path(args.index))
    with build_index(checkpoint, gallery, Path(args.index)) as index:  # with the index's own settings
        print(f"{args.index}: {len(index) - before} new images added from {gallery}, {len(index)} in all")


def _cmd_index_remove(args: argparse.Namespace) -> None:
    from cirlab.index.build import open_index

    with open_index(Path(args.index)) as index:
        index.remove(args.ids)
        index.commit()
        print(f"{args.index}: removed {len(set(args.ids))} images, {len(index)} left")


def _cmd_index_info(args: argparse.Namespace) -> None:
    from cirlab.index.build import open_index

    with open_index(Path(args.index)) as index:
        print(json.dumps(index.info(), indent=2, default=str))


def _cmd_search(args: argparse.Namespace) -> None:
    from cirlab.checkpoint import load_checkpoint
    from cirlab.images import load_image
    from cirlab.index.build import model_identity, open_index, recorded_checkpoint
    from cirlab.index.search import DEFAULT_SHORTLIST, search_index

    _require_text(args.text)
    checkpoint = Path(args.checkpoint) if args.checkpoint else recorded_checkpoint(Path(args.index))
    model = load_checkpoint(checkpoint).model
    opened = open_index(Path(args.index), model_id=model_identity(checkpoint), consistency=args.milvus_consistency,
                        faiss_params=args.faiss_params)
    with opened as index:
        reference = args.id if args.id is not None else load_image(Path(args.image))
        results = search_index(index, model, reference, args.text, k=args.k,
                               shortlist=args.shortlist or DEFAULT_SHORTLIST)
        gallery = index.gallery_root
    if args.json:
        print(json.dumps([{"id": name, "path": str(gallery / name) if gallery else None, "score": score}
                          for name, score in results], indent=2))
    else:
        for rank, (name, score) in enumerate(results, 1):
            print(f"{rank:3d}  {score:.4f}  {name}")
    if args.explain and results:
        if gallery is None:
            raise ValueError(f"{args.index}: the index records no gallery folder, so --explain cannot read the result")
        if isinstance(reference, str):
            reference = load_image(gallery / reference)
        _write_explanation(model, reference, args.text, load_image(gallery / results[0][0]), Path(args.explain))


def _write_explanation(model: CIRModel, reference: Image.Image, text: str, target: Image.Image, out: Path,
                       method: str = "mmgrad",
                       side: str = "reference", scale: int = 4) -> None:
    """The heat-map overlay of `method` on the `side` image, written atomically to `out` (PNG)."""
    from cirlab.explain.overlay import explain_pair, heatmap_overlay
    from cirlab.files import atomic_write_bytes, png_bytes
    from cirlab.images import fit_image

    saliency = explain_pair(model, reference, text, target, method=method, side=side)
    explained = fit_image(reference if side == "reference" else target, model.preprocessing)
    atomic_write_bytes(out, png_bytes(heatmap_overlay(explained, saliency, scale=scale)))
    row, col = divmod(int(saliency.argmax()), saliency.shape[1])
    print(f"wrote {out} ({method} on the {side} image; hottest pixel at row {row}, column {col})")


def _cmd_explain(args: argparse.Namespace) -> None:
    from cirlab.checkpoint import load_checkpoint
    from cirlab.images import load_image

    _require_text(args.text)
    reference, target = load_image(Path(args.image)), load_image(Path(args.target))
    model = load_checkpoint(Path(args.checkpoint)).model
    _write_explanation(model, reference, args.text, target, Path(args.out), args.method, args.side, args.scale)


def _cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from cirlab.index.build import recorded_checkpoint
    from cirlab.index.search import DEFAULT_SHORTLIST
    from cirlab.serve.app import SearchSettings, create_app

    checkpoint = Path(args.checkpoint) if args.checkpoint else recorded_checkpoint(Path(args.index))
    settings = SearchSettings(batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch,
                              shortlist=args.shortlist or DEFAULT_SHORTLIST, consistency=args.milvus_consistency,
                              faiss_params=args.faiss_params)
    app = create_app(Path(args.index), checkpoint, search=settings)
    print(f"serving {args.index} on http://{args.host}:{args.port} (API docs at /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _cmd_demo(args: argparse.Namespace) -> None:
    from cirlab.demo import run_demo

    run_demo(Path(args.out), Path(args.config), data_root=Path(args.data) if args.data else None)


def _cmd_models(args: argparse.Namespace) -> None:
    from cirlab.models.registry import available_models

    print("\n".join(available_models()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cirlab",
                                     description="Composed image retrieval: data, training, evaluation, search.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="generate and check datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    make_css = data_commands.add_parser("make-css", help="write a synthetic CSS dataset in the real CSS format")
    make_css.add_argument("out", help="output folder")
    make_css.add_argument("--preset", choices=["demo", "full"], default="demo",
                          help="demo: small, for a 5-minute CPU run; full: TIRG scale (~16K queries per split)")
    make_css.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    make_css.add_argument("--image-size", type=int, default=64, help="pixels; the drawing scales with it")
    make_css.add_argument("--families", type=int, help="edit families per split instead of the preset's "
                          "(a family: 35 queries, 43 images); for quick trials")
    make_css.add_argument("--with-3d", action="store_true",
                          help="also write a CLEVR-like 3D render of every scene to images_3d/ (train on them with "
                               "--set data.render=3d, or data.query_render=2d data.target_render=3d)")
    make_css.set_defaults(func=_cmd_make_css)
    make_cirr = data_commands.add_parser("make-cirr", help="write a synthetic CIRR (CSS scenes in sets of six, "
                                         "rc2 files and folders) that the CIRR reader reads")
    make_cirr.add_argument("out", help="output folder (new or empty)")
    make_cirr.add_argument("--preset", choices=["demo", "full"], default="demo",
                           help="demo: 720 queries in seconds; full: CIRR scale (28K train, 4,160 val/test1 queries)")
    make_cirr.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    make_cirr.add_argument("--image-size", type=int, default=64, help="pixels; the drawing scales with it")
    make_cirr.set_defaults(func=_cmd_make_cirr)
    make_circo = data_commands.add_parser("make-circo", help="write a synthetic CIRCO (CSS scenes, CIRCO's annotations "
                                          "and COCO-style image folder) whose gt_img_ids list every ground truth")
    make_circo.add_argument("out", help="output folder")
    make_circo.add_argument("--preset", choices=["demo", "full"], default="demo",
                            help="demo: 30 val and 30 test queries in seconds; full: CIRCO's 220 val and 800 test "
                                 "queries over about 8,000 images")
    make_circo.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    make_circo.add_argument("--image-size", type=int, default=64, help="pixels; the drawing scales with it")
    make_circo.set_defaults(func=_cmd_make_circo)
    make_garments = data_commands.add_parser(
        "make-garments", help="write synthetic dresses, shirts and tops in the real FashionIQ and Fashion200k layouts")
    make_garments.add_argument("out", help="output folder")
    make_garments.add_argument("--preset", choices=["demo", "full"], default="demo",
                               help="demo: 300 triplets per category; full: 6,000 per category (FashionIQ scale)")
    make_garments.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    make_garments.add_argument("--image-size", type=int, default=256, help="pixels (at least 32)")
    make_garments.add_argument("--layout", choices=["fashioniq", "fashion200k", "both"], default="both",
                               help="which real layout to write; both: one folder that both readers accept")
    make_garments.add_argument("--families", type=int, help="families per category and split instead of the "
                               "preset's (a family: 5 images, 3 triplets); for quick trials")
    make_garments.set_defaults(func=_cmd_make_garments)
    check = data_commands.add_parser("check", help="list every missing image and malformed record of a dataset")
    check.add_argument("root", help="dataset folder")
    check.add_argument("--format", required=True,
                       choices=["css", "fashioniq", "cirr", "shoes", "fashion200k", "mitstates", "folder", "circo"])
    check.set_defaults(func=_cmd_check)
    masks = data_commands.add_parser(
        "masks", help="cache one dominant-portion mask per image (OFFSET) in DATA/dominant_masks/SOURCE/; "
        "prints their IoU against the generator's masks where the dataset has them")
    masks.add_argument("root", help="dataset folder")
    masks.add_argument("--source", choices=["saliency", "oracle", "clipseg"], default="saliency",
                       help="saliency: offline colour segmentation (default); oracle: the synthetic garments' "
                            "ground truth; clipseg: CLIPSeg from --weights")
    masks.add_argument("--weights", help="clipseg: local folder of a CLIPSegForImageSegmentation and its processor")
    masks.add_argument("--prompt", help="clipseg: the prompt of images without a caption (default: the main object)")
    masks.add_argument("--captions", help="clipseg: JSON object of image file stem -> caption to prompt with")
    masks.add_argument("--device", default="auto", help="clipseg: auto, cpu, cuda, ...")
    masks.add_argument("--overwrite", action="store_true", help="recompute every mask (e.g. after changing settings)")
    masks.set_defaults(func=_cmd_masks)

    train = commands.add_parser("train", help="train a model from a YAML config", epilog=EPILOG)
    train.add_argument("--config", help="YAML run config, e.g. configs/css/tirg.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    train.add_argument("--out", required=True, help="run folder (checkpoints best/ and last/, metrics.jsonl)")
    continuing = train.add_mutually_exclusive_group()
    continuing.add_argument("--resume", action="store_true", help="continue exactly from OUT/last")
    continuing.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser(
        "eval", help="Recall@K of a checkpoint under its benchmark's protocol",
        epilog="Protocol choices are settings too: --set protocol.ks=[1,10], --set protocol.split=test1 (CIRR), "
               "--set protocol.caption_join=symmetric (FashionIQ); README, 'Benchmarks', lists them all.")
    evaluate.add_argument("checkpoint", help="checkpoint folder (RUN/best)")
    evaluate.add_argument("--explain", dest="explain_queries", nargs="?", type=int, const=1000, default=0,
                          metavar="QUERIES", help="add explanation metrics (pointing game, energy in mask, PxAP, "
                          "per edit type, with random and centre-prior baselines) on QUERIES sampled queries "
                          "(default 1000); needs the edit regions of a generated CSS dataset")
    evaluate.add_argument("--explain-method", choices=["mmgrad", "gradcam"], default="mmgrad")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    evaluate.add_argument("--out", help="output path: PATH.json and PATH.md, a given .json or .md suffix "
                          "kept (default: RUN/eval-SPLIT, or RUN/eval-FORMAT-SPLIT with --set data.format=FORMAT)")
    evaluate.add_argument("--submission", metavar="DIR", help="write the test server's files of protocol.split "
                          "to DIR instead of scoring: CIRR (default test1) recall_submission_RUN.json and "
                          "recall_subset_submission_RUN.json; CIRCO (default test) circo_submission_RUN.json")
    evaluate.set_defaults(func=_cmd_eval)

    index = commands.add_parser("index", help="build and inspect a persistent gallery index (FAISS or Milvus)")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="INDEX_COMMAND")
    build = index_commands.add_parser("build", help="embed a gallery folder into an index; reruns add only what "
                                                    "is missing, so an interrupted build resumes")
    build.add_argument("checkpoint", help="checkpoint folder (RUN/best)")
    build.add_argument("image_dir", help="gallery folder (png, jpg, jpeg, webp, bmp, gif, tif, tiff; searched "
                                          "recursively)")
    build.add_argument("--out", required=True, help="index folder")
    build.add_argument("--backend", choices=["faiss", "milvus"],
                       help="where the vectors go: FAISS files in the index folder (default for a new index) or a "
                            "Milvus collection; the index folder keeps the ids either way")
    build.add_argument("--factory", help="FAISS factory string: Flat (exact, the default), IVF64,Flat, HNSW32, ...")
    build.add_argument("--milvus-uri", help="Milvus server for --backend milvus, e.g. http://host:19530 (a token, if "
                                            "needed, goes in $CIRLAB_MILVUS_TOKEN)")
    build.add_argument("--collection", help="Milvus collection (default: cirlab_<folder>_<hash of its path>)")
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    build.set_defaults(func=_cmd_index_build)
    add = index_commands.add_parser("add", help="embed the images added to the index's gallery folder since "
                                                "the last build")
    add.add_argument("index", help="index folder")
    add.add_argument("--checkpoint", help="checkpoint folder (default: the one the index was built with)")
    add.set_defaults(func=_cmd_index_add)
    remove = index_commands.add_parser("remove", help="take images out of an index (delete the files too, or "
                                                      "a later `index add` brings them back)")
    remove.add_argument("index", help="index folder")
    remove.add_argument("ids", nargs="+", help="image ids (paths relative to the gallery folder)")
    remove.set_defaults(func=_cmd_index_remove)
    info = index_commands.add_parser("info", help="what an index holds: model id, size, factory, gallery folder")
    info.add_argument("index", help="index folder")
    info.set_defaults(func=_cmd_index_info)

    search = commands.add_parser("search", help="composed query against an index: a reference image and a text")
    search.add_argument("index", help="index folder")
    search.add_argument("--checkpoint", help="checkpoint folder (default: the one the index was built with)")
    reference = search.add_mutually_exclusive_group(required=True)
    reference.add_argument("--image", help="reference image file")
    reference.add_argument("--id", help="reference given as a gallery image id (its path in the gallery)")
    search.add_argument("--text", required=True, help='the modification, e.g. "make top-left object red"')
    search.add_argument("-k", type=int, default=10, help="number of results")
    search.add_argument("--json", action="store_true", help="print JSON (ids, paths, scores) instead of a table")
    _add_search_settings(search)
    search.add_argument("--explain", metavar="OUT.png", help="also write an MMGrad heat-map over the reference: "
                                                             "where the model looked for the top result")
    search.set_defaults(func=_cmd_search)

    explain = commands.add_parser("explain", help="heat-map of where the model looked, as a PNG overlay")
    explain.add_argument("checkpoint", help="checkpoint folder (RUN/best)")
    explain.add_argument("--image", required=True, help="reference image file")
    explain.add_argument("--text", required=True, help="the modification text")
    explain.add_argument("--target", required=True, help="target (retrieved) image file")
    explain.add_argument("--method", choices=["mmgrad", "gradcam"], default="mmgrad",
                         help="mmgrad: text-conditioned feature difference; gradcam: the retrieval score")
    explain.add_argument("--side", choices=["reference", "target"], default="reference", help="image to explain")
    explain.add_argument("--scale", type=int, default=4, help="enlarge the overlay this many times")
    explain.add_argument("--out", required=True, help="output PNG")
    explain.set_defaults(func=_cmd_explain)

    serve = commands.add_parser("serve", help="REST API over an index (search, gallery images, explanations)")
    serve.add_argument("index", help="index folder")
    serve.add_argument("--checkpoint", help="checkpoint folder (default: the one the index was built with)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    from cirlab.serve.batching import BATCH_WAIT_MS, MAX_BATCH  # plain asyncio: `cirlab --help` stays light

    serve.add_argument("--batch-wait-ms", metavar="MS", type=float, default=BATCH_WAIT_MS,
                       help="gather concurrent searches this long into one model pass and index search "
                            f"(default: {BATCH_WAIT_MS:g}; 0: each search runs alone)")
    serve.add_argument("--max-batch", metavar="N", type=int, default=MAX_BATCH,
                       help=f"at most this many searches in one batch (default: {MAX_BATCH})")
    _add_search_settings(serve)
    serve.set_defaults(func=_cmd_serve)

    demo = commands.add_parser("demo", help="generate demo CSS, train image-only/concat/TIRG, report")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--config", default="configs/css/demo.yaml", help="the demo's training recipe")
    demo.add_argument("--data", help="use this CSS folder instead of generating OUT/data")
    demo.set_defaults(func=_cmd_demo)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cirlab.checkpoint import CheckpointError
    from cirlab.data.errors import DataFormatError
    from cirlab.index.base import IndexStoreError, UnknownImageError

    try:
        code = args.func(args)
    except (ConfigError, DataFormatError, CheckpointError, IndexStoreError, FileNotFoundError, FileExistsError,
            ValueError) as error:
        print(f"cirlab: error: {error}", file=sys.stderr)
        return 2
    except UnknownImageError as error:
        print(f"cirlab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cirlab: interrupted", file=sys.stderr)
        return 130
    return code or 0
