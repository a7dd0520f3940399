"""The `gallery` command: small tools around the pipeline (the pipeline itself is flows/train_flow.py).

Exit status: 0 on success, 2 on a user error (one paragraph naming the input and the fix, never a
traceback; `--debug` shows it), 1 on anything else (a bug: the message says so), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from gallery.errors import ContractError, UserError
from gallery.storage import StorageError

EXIT_USER = 2
EXIT_BUG = 1


def cmd_synth(args) -> int:
    from pydantic import ValidationError

    from gallery.config import problems_text
    from gallery.data.synth import SynthSettings, generate

    try:
        settings = SynthSettings(galleries=args.galleries, seed=args.seed, image_size=args.image_size,
                                 min_images=args.min_images, max_images=args.max_images,
                                 metric_tasks=not args.no_metric_tasks)
    except ValidationError as e:
        print(problems_text(e, SynthSettings, "gallery synth"), file=sys.stderr)
        return EXIT_USER
    start = time.perf_counter()
    manifest = generate(args.out, settings, workers=args.workers)
    print(f"wrote {manifest}, {manifest.parent / 'tasks.yaml'}"
          + (f" and {manifest.parent / 'co_views.parquet'}" if settings.metric_tasks else "") + " "
          f"({settings.galleries} galleries, {time.perf_counter() - start:.1f}s)")
    return 0


def cmd_validate(args) -> int:
    if not args.config and not args.manifest:
        raise UserError("give --config (settings) or --manifest and --tasks (data), or all three")
    if bool(args.manifest) != bool(args.tasks):
        raise UserError("--manifest and --tasks go together")
    split = {}
    if args.config:
        from gallery.config import load_settings

        s = load_settings(args.config)
        split = {"valid_fraction": s.data.split.valid, "test_fraction": s.data.split.test}
        print(f"settings {args.config}: ok ({s.model.backbone} at {s.model.image_size} px, {s.model.pooling} pooling, "
              f"weightings {', '.join(s.train.weightings)}, up to {s.train.max_epochs} epochs)")
    if args.manifest:
        from gallery.data.ingest import describe, ingest

        print(describe(ingest(args.manifest, args.tasks, **split)))
    return 0


def cmd_model_summary(args) -> int:
    from dataclasses import replace

    from pydantic import ValidationError

    from gallery.config import ModelSettings, load_settings, problems_text
    from gallery.data.contracts import load_task_spec
    from gallery.model.gallery_model import build_model, parameter_counts

    settings = load_settings(args.config)
    spec = load_task_spec(args.tasks)
    try:
        m = replace(settings.model, weights="random",  # counting needs no weights
                    **{k: v for k, v in (("backbone", args.backbone), ("pooling", args.pooling),
                                         ("trainable_blocks", args.trainable_blocks)) if v is not None})
    except ValidationError as e:
        print(problems_text(e, ModelSettings, "gallery model-summary"), file=sys.stderr)
        return EXIT_USER
    model = build_model(m, spec.tasks)
    c = parameter_counts(model)
    print(f"model: {m.backbone} at {m.image_size} px (top: {model.encoder.images.split}), {m.pooling} pooling, "
          f"{model.encoder.dim}-d embedding, {len(spec.tasks)} task heads of hidden width {m.hidden}")
    print(f"image trunk (frozen) {c['trunk']:>13,}   image top (trainable) {c['top']:>11,}   "
          f"pooling {c['pooling']:>10,}")
    rows = [("encoder", c["encoder_trainable"], c["encoder_frozen"]), ("heads", c["heads_trainable"], c["heads_frozen"]),
            ("total", c["encoder_trainable"] + c["heads_trainable"], c["encoder_frozen"] + c["heads_frozen"])]
    for label, trainable, frozen in rows:
        print(f"{label:<9} trainable {trainable:>11,}   frozen {frozen:>10,}")
    return 0


def cmd_bench(args) -> int:
    if args.what == "train":
        from gallery.bench.train import bench_train

        bench_train(steps=args.steps, device=args.device)
    elif args.what == "weightings":
        from gallery.bench.weightings import bench_weightings

        bench_weightings(steps=args.steps, rounds=args.rounds, device=args.device)
    elif args.what == "scale":
        from gallery.bench.scale import bench_scale

        bench_scale(sizes=tuple(args.galleries))
    elif args.what == "seeds":
        from gallery.bench.seeds import bench_seeds

        bench_seeds(runs=args.runs, preset=args.config or "default", out=args.out or "seeds-bench")
    elif args.what == "pipeline":
        from gallery.bench.pipeline import bench_pipeline

        bench_pipeline(factors=args.factors, preset=args.config or "default", image_size=args.image_size,
                       epochs=args.epochs, out=args.out)
    elif args.what == "faults":
        from gallery.bench.faults import bench_faults

        outcomes = bench_faults(preset=args.config or "smoke", out=args.out or "faults-bench")
        return 0 if all(o.fired and o.identical for o in outcomes) else 1
    elif args.what == "serve":
        from gallery.bench.serve import bench_serve

        bench_serve(sizes=args.sizes or [10_000, 1_000_000], clients=args.clients, seconds=args.seconds, queries=args.queries)
    else:
        from gallery.bench.search import bench_search

        bench_search(sizes=args.sizes or [1_000_000, 10_000_000], dim=args.dim, queries=args.queries, code_name=args.code)
    return 0


def cmd_search(args) -> int:
    from dataclasses import replace

    from gallery.config import RetrievalSettings
    from gallery.retrieval.search import model_run_id, search_embeddings

    model_run = None
    if args.images:  # seed images are embedded by a training run's model
        from gallery.retrieval.search import check_seeds
        from gallery.runs import trained_run

        check_seeds(args.images)  # an unreadable seed is named before the run is looked up
        model_run = trained_run(args.run or model_run_id(args.embeddings))
    settings = replace(RetrievalSettings(), rerank=args.rerank, approximate_above=args.approximate_above)
    hits = search_embeddings(args.embeddings, k=args.k, binary=args.binary, images=args.images,
                             gallery_id=args.gallery_id, model_run=model_run, settings=settings,
                             log=lambda line: print(line, file=sys.stderr))
    hamming = args.binary and not args.rerank
    print(f"{'rank':>4}  {'gallery_id':<24} {'hamming bits' if hamming else 'cosine'}")
    for rank, (gallery_id, value) in enumerate(hits, 1):
        print(f"{rank:>4}  {gallery_id:<24} {value:.0f}" if hamming else f"{rank:>4}  {gallery_id:<24} {value:.4f}")
    return 0


def cmd_export_model(args) -> int:
    from gallery.runs import export_run_model

    export_run_model(args.run, args.out, args.weighting, args.pooling, args.seed,
                     log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {args.out}: load it with gallery.load_model({args.out!r}) (docs/shipping.md)")
    return 0


def cmd_compare(args) -> int:
    from gallery.compare.comparison import compare
    from gallery.compare.render import write_comparison
    from gallery.compare.sides import side

    a, b = side(args.a, args.embeddings_a), side(args.b, args.embeddings_b)
    comparison = compare(a, b, args.k)
    out = args.out or f"compare-{a.run_id or 'A'}-vs-{b.run_id or 'B'}"
    written = write_comparison(comparison, out)
    print(f"{comparison.verdict}: {'; '.join(comparison.reasons)}\nmean top-{comparison.stability.k} overlap "
          f"{comparison.stability.mean_overlap.estimate:.0%} on {comparison.common:,} common galleries "
          f"({comparison.seconds:.1f} s)\nwrote {written['compare.md']} and {', '.join(n for n in written if n != 'compare.md')}")
    return 0


def serve_limits(args):
    """The server's Limits from `gallery serve`'s options."""
    from gallery.serve.limits import MB, Limits, resolved_roots

    return Limits(max_body_bytes=args.max_body_mb * MB, max_photos=args.max_photos, max_photo_bytes=args.max_photo_mb * MB,
                  max_request_pixels=args.max_megapixels * 1_000_000, allowed_roots=resolved_roots(args.allow_root),
                  decoding_pixels=args.decoding_megapixels and args.decoding_megapixels * 1_000_000,
                  workers=args.workers)


def cmd_serve(args) -> int:
    from gallery.serve.app import run_server
    from gallery.serve.service import SEARCHES, open_service, service_from_model

    limits = serve_limits(args)
    searches = SEARCHES if args.search == "both" else (args.search,)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.model:
        if not args.embeddings or args.run:
            raise UserError("--model serves an exported model folder with the embeddings file its model made: give "
                            "--embeddings FILE, and no --run")
        service = service_from_model(args.model, args.embeddings, args.manifest, args.tasks, searches, log=log)
    else:
        service = open_service(args.run, args.embeddings, args.manifest, args.tasks, searches, log=log)
    comparison = _comparison(service, args.compare, log=log)
    print(f"serving run {service.run_id} ({len(service.ids):,} galleries) at http://{args.host}:{args.port}/ "
          f"(API: /openapi.json)", file=sys.stderr)
    run_server(service, limits, args.host, args.port, comparison)
    return 0


def _comparison(service, other: str | None, log, k: int | None = None):
    """The compare view's comparison of the service's embeddings with `--compare`'s, or None without it."""
    if other is None:
        return None
    from gallery.compare.neighbours import K
    from gallery.serve.compare import CompareView, comparison_location

    return CompareView(service, comparison_location(other), k or K, log=log)


def cmd_explorer(args) -> int:
    from gallery.serve.explorer import export_explorer
    from gallery.serve.service import open_service

    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    service = open_service(args.run, args.embeddings, args.manifest, args.tasks, with_model=False, log=log)
    export_explorer(service, args.out, k=args.k, log=log, comparison=_comparison(service, args.compare, log, args.k))
    return 0


def _count(text: str) -> int:
    """A whole number >= 0 for an option, or argparse's usage error naming it."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text[:40]!r}")
    return int(text)


def _positive(text: str) -> int:
    """A whole number >= 1 for an option, or argparse's usage error naming it."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text[:40]!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    from gallery.config import RetrievalSettings

    defaults = RetrievalSettings()
    debug = argparse.ArgumentParser(add_help=False)  # accepted before or after the subcommand
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    parser = argparse.ArgumentParser(prog="gallery", description=__doc__, parents=[debug],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", parents=[debug], help="write the synthetic accommodation catalogue (manifest, tasks, images)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--galleries", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96, help="pixels per side")
    p.add_argument("--min-images", type=int, default=4)
    p.add_argument("--max-images", type=int, default=12)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--no-metric-tasks", action="store_true",
                   help="no re-listings (property_id), co-views or their identity and pairs tasks")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("validate", parents=[debug], help="check settings, or a manifest and task spec against the data contract, "
                                         "without running anything")
    p.add_argument("--config", default=None, help="settings: a preset name (smoke, default, study, paper) or a JSON file")
    p.add_argument("--manifest", default=None, help="Parquet, CSV or JSON Lines manifest")
    p.add_argument("--tasks", default=None, help="YAML or JSON task spec")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("model-summary", parents=[debug], help="trainable and frozen parameter counts of encoder and heads")
    p.add_argument("--config", required=True, help="a preset name (smoke, default, study, paper) or settings JSON")
    p.add_argument("--tasks", required=True, help="task spec (multiclass tasks need classes or num_classes)")
    p.add_argument("--backbone", default=None, help="instead of the settings' model.backbone: a built-in name, "
                                                     "torchvision:<model> or timm:<model> (docs/models.md)")
    p.add_argument("--pooling", default=None, help="instead of the settings' model.pooling")
    p.add_argument("--trainable-blocks", type=_count, default=None,
                   help="instead of the settings' model.trainable_blocks (blocks of the backbone, from the top, that train)")
    p.set_defaults(func=cmd_model_summary)

    p = sub.add_parser("search", parents=[debug], help="nearest galleries to seed images or to a gallery")
    p.add_argument("--embeddings", required=True, help="an embeddings Parquet file (train or embed flow)")
    p.add_argument("--run", default=None, help="GalleryTrainFlow run id (or latest) whose model embeds the seeds; "
                                               "default: the run that made the embeddings")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--images", nargs="+", default=None, help="seed images, embedded together as one gallery")
    query.add_argument("--gallery-id", default=None, help="use this gallery's embedding as the query")
    p.add_argument("-k", type=_positive, default=10, help="galleries to return (default 10)")
    p.add_argument("--binary", action="store_true",
                   help="search the file's binary codes: Hamming distance finds candidates, exact cosine orders them")
    p.add_argument("--rerank", type=_count, default=defaults.rerank,
                   help=f"with --binary: code candidates re-ranked by cosine (default {defaults.rerank}; 0: Hamming order)")
    p.add_argument("--approximate-above", type=_count, default=defaults.approximate_above,
                   help=f"galleries above which an approximate index (HNSW, binary IVF) is built once, saved beside "
                        f"the embeddings and reused (default {defaults.approximate_above:,})")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export-model", parents=[debug], help="a run's model as a folder to ship: safetensors weights, "
                                                             "ONNX graphs, binary code, model card, config")
    p.add_argument("--run", default="latest", help="GalleryTrainFlow run id (default: latest)")
    p.add_argument("--out", required=True, help="the folder (or s3:// prefix) to write")
    p.add_argument("--weighting", default=None, help="another trained model's weighting (default: the exported one's)")
    p.add_argument("--pooling", default=None, help="with a study: the model's pooling (default: the preset's)")
    p.add_argument("--seed", type=_count, default=None, help="with evaluation.seeds: the model's seed (default: the preset's)")
    p.set_defaults(func=cmd_export_model)

    p = sub.add_parser("compare", parents=[debug], help="is model B better than model A? transfer, retrieval and "
                                                        "neighbour stability paired on the same galleries")
    p.add_argument("a", help="run id (or latest) or exported model folder: the current model")
    p.add_argument("b", help="run id or exported model folder: the candidate")
    p.add_argument("--embeddings-a", default=None, help="with a model folder A: the embeddings file its model made")
    p.add_argument("--embeddings-b", default=None, help="with a model folder B: the embeddings file its model made")
    p.add_argument("--out", default=None, help="folder for compare.md, compare.json, figures (default: compare-<A>-vs-<B>)")
    p.add_argument("-k", type=_positive, default=10, help="neighbours compared per gallery (default 10)")
    p.set_defaults(func=cmd_compare)

    for name, helper in (("serve", "the search service and explorer page of a training run (an HTTP server)"),
                         ("explorer", "write the explorer page as one self-contained HTML file")):
        p = sub.add_parser(name, parents=[debug], help=helper)
        source = p.add_mutually_exclusive_group()
        source.add_argument("--run", default=None, help="GalleryTrainFlow run id or latest (default: latest, or the run "
                                                        "named by --embeddings)")
        source.add_argument("--embeddings", default=None, help="an embeddings Parquet file (train or embed flow) instead "
                                                               "of a run's own")
        p.add_argument("--manifest", default=None, help="catalogue manifest for photos and attributes (default: the run's)")
        p.add_argument("--tasks", default=None, help="task spec naming the tasks and held-out attributes (with --manifest)")
        p.add_argument("--compare", default=None, metavar="RUN_OR_FILE",
                       help="another run id or embeddings Parquet file of the same galleries: the compare view, both "
                            "maps side by side and each gallery's top-k neighbours under both")
    p = sub.choices["serve"]
    p.add_argument("--model", default=None, metavar="FOLDER",
                   help="an exported model folder (gallery export-model) to serve with --embeddings, no run store needed")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=_count, default=8000)
    p.add_argument("--allow-root", action="append", default=[],
                   help="a folder (or s3:// prefix) whose photos requests may name as seed paths; repeatable "
                        "(default: none, only uploads)")
    p.add_argument("--search", choices=["both", "float", "code"], default="both",
                   help="indexes to hold: code alone keeps a large catalogue's memory small (default both)")
    p.add_argument("--workers", type=_count, default=4, help="requests computed at once (default 4)")
    p.add_argument("--max-body-mb", type=_count, default=64, help="largest request body (default 64 MiB)")
    p.add_argument("--max-photos", type=_count, default=44, help="most photos per request (default 44)")
    p.add_argument("--max-photo-mb", type=_count, default=16, help="largest photo (default 16 MiB)")
    p.add_argument("--max-megapixels", type=_count, default=100,
                   help="most pixels of all seed photos of one request, in millions (default 100)")
    p.add_argument("--decoding-megapixels", type=_count, default=None,
                   help="most pixels all requests together decode at once, in millions; a request waits (at most "
                        "10 s, then 503) until its photos fit (default: --max-megapixels)")
    p.set_defaults(func=cmd_serve)
    p = sub.choices["explorer"]
    p.add_argument("--out", required=True, help="the HTML file to write (e.g. reports/<run id>/explorer.html)")
    p.add_argument("-k", type=_count, default=10, help="neighbours kept per gallery (default 10)")
    p.set_defaults(func=cmd_explorer)

    p = sub.add_parser("bench", parents=[debug], help="benchmarks that print ratios measured side by side")
    p.add_argument("what", choices=["train", "weightings", "scale", "pipeline", "search", "serve", "seeds", "faults"],
                   help="train: our step vs a plain PyTorch step, feature cache vs recompute, packed vs padded; "
                        "weightings: each loss weighting's training step against pseudo-uniform's (default preset); "
                        "scale: peak memory and speed of preprocess, train and export for two catalogue sizes; "
                        "pipeline: the whole train flow at 1x and 10x the preset's galleries (--factors 1 10 50): each "
                        "step's time and peak memory, each output's size; "
                        "search: exact and approximate search over float vectors and binary codes, and two-stage search; "
                        "serve: the service's latency by gallery id and by 10 seed photos, and a load test on 127.0.0.1; "
                        "seeds: the train flow run --runs times changing only train.seed, and how often each of the "
                        "report's readings keeps its sign; "
                        "faults: the train flow (smoke preset) killed in every step, retried or resumed, against an "
                        "uninterrupted run (about 12 minutes on 2 cores)")
    p.add_argument("--steps", type=int, default=4, help="train, weightings: timed training steps per variant (per round)")
    p.add_argument("--device", default=None, help="train, weightings: cpu or cuda (default: cuda when present)")
    p.add_argument("--rounds", type=int, default=5, help="weightings: rounds over the timed steps (more: less noise)")
    p.add_argument("--galleries", type=int, nargs=2, default=[1_500, 15_000], help="scale: the two catalogue sizes")
    p.add_argument("--sizes", type=_count, nargs="+", default=None,
                   help="search: catalogue sizes (float variants only where the vectors fit in memory; the default "
                        "1000000 10000000 takes about 40 minutes on 2 cores); serve: default 10000 1000000")
    p.add_argument("--dim", type=_count, default=1280, help="search: embedding dimension")
    p.add_argument("--queries", type=_count, default=100, help="search, serve: queries timed one at a time")
    p.add_argument("--clients", type=_count, default=8, help="serve: concurrent clients of the load test")
    p.add_argument("--seconds", type=_count, default=30, help="serve: length of the load test")
    p.add_argument("--code", default=defaults.code, help=f"search: binary code (default {defaults.code})")
    p.add_argument("--factors", type=float, nargs="+", default=[1, 10],
                   help="pipeline: catalogue sizes as multiples of the preset's galleries (default 1 10)")
    p.add_argument("--image-size", type=_count, default=32, help="pipeline: image size of the runs (default 32 px)")
    p.add_argument("--epochs", type=_count, default=2, help="pipeline: epochs of every model (default 2)")
    p.add_argument("--runs", type=_count, default=3, help="seeds: runs, with train.seed 0, 1, ... (default 3)")
    p.add_argument("--config", default=None, help="seeds, pipeline, faults: a preset name or settings JSON "
                                                   "(default: default; faults: smoke)")
    p.add_argument("--out", default=None, help="seeds: the folder for the runs' stores, reports and seeds.md "
                                               "(default: seeds-bench); pipeline: keep the runs and the table there; "
                                               "faults: the runs and faults.md (default: faults-bench)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's usage errors (status 2) and --help (0)
        return e.code if isinstance(e.code, int) else EXIT_USER
    debug = getattr(args, "debug", False)
    try:
        from gallery.runs import use_metaflow_s3_settings

        use_metaflow_s3_settings()  # s3:// files are read as the flows read them
        return args.func(args)
    except ContractError as e:
        return _fail(str(e), debug)
    except UserError as e:
        return _fail(f"gallery {args.command}: {e}", debug)
    except StorageError as e:  # the store's own words: the location, what was tried, the fix
        return _fail(f"gallery {args.command}: {e}", debug)
    except OSError as e:  # a file the command writes or reads: a full disk, a folder it may not write
        where = f" {e.filename}" if e.filename else ""
        return _fail(f"gallery {args.command}:{where} {e.strerror or e}: check the path and its permissions", debug)
    except KeyboardInterrupt:
        print(f"gallery {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        _fail(f"gallery {args.command}: unexpected error ({e.__class__.__name__}: {str(e)[:300]}); this is a bug in "
              "gallery: run again with --debug for the traceback and report it", debug)
        return EXIT_BUG


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())
