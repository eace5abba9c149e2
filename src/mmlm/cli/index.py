"""`mmlm index build|info`, `mmlm search` and `mmlm curate`: thin commands over mmlm.index and mmlm.data.curate."""

import argparse
import json
import sys

from mmlm.cli.model_args import add_device_args, add_model_args, add_revision_arg, load_model
from mmlm.errors import InputError


def cmd_index_build(args: argparse.Namespace) -> None:
    """Embed the images of a folder or manifest into an index, resuming or extending one that exists."""
    from mmlm.index.build import build_index
    from mmlm.index.vectors import AnnSettings

    if args.ann_threshold < 1:
        raise InputError(f"--ann-threshold must be at least 1, got {args.ann_threshold}")
    if not 0 < args.target_recall <= 1:
        raise InputError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    ann = AnnSettings(threshold=args.ann_threshold, nlist=args.nlist, target_recall=args.target_recall)
    model = load_model(args)
    report = build_index(
        model, args.model, args.images, args.index, args.batch_size, ann, revision=args.revision
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(
        f"added {report.added} images in {report.seconds:.1f} s ({report.images_per_s:.1f} images/s); "
        f"{report.already_indexed} already indexed; {report.unreadable} unreadable"
        + (f"; {report.replaced} replaced (file changed)" if report.replaced else "")
    )
    for skipped in report.skipped:
        print(f"  skipped {skipped['path']}: {skipped['reason']}")
    print(f"index {args.index}: {report.images} images, {_describe(report.ann)}")


def _describe(ann: dict) -> str:
    if ann.get("kind") != "ivf":
        return "exact search (FAISS IndexFlatIP)"
    return (
        f"IVF search (nlist={ann['nlist']}, nprobe={ann['nprobe']}): recall@10 {ann['recall_at_10']:.3f} "
        f"against exact search on {ann.get('recall_queries', '?')} sample queries"
    )


def cmd_index_info(args: argparse.Namespace) -> None:
    """Print what an index records: size, model, search kind and its recall check."""
    from mmlm.index.store import ImageIndex

    with ImageIndex.open(args.index) as index:
        print(json.dumps(index.info, indent=2))


def cmd_search(args: argparse.Namespace) -> None:
    """Print the indexed images closest to a text or an image query."""
    import mmlm
    from mmlm.index.store import ImageIndex

    if (args.text is None) == (args.image is None):
        raise InputError("give exactly one of --text or --image")
    if args.text is not None and not args.text.strip():
        raise InputError("--text: got an empty query")
    with ImageIndex.open(args.index) as index:
        model_path = args.model or index.metadata.get("model_path")
        if not model_path:
            raise InputError(f"--model: the index {args.index} records no model; give --model")
        revision = args.revision if args.model else index.metadata.get("model_revision")
        model = mmlm.load(model_path, device=args.device, dtype=args.dtype, revision=revision)
        index.check_model(model)
        query = model.encode_text([args.text]) if args.text is not None else model.encode_image([args.image])
        hits = index.search(query, args.k)[0]
    if args.json:
        what = {"text": args.text} if args.text is not None else {"image": args.image}
        print(json.dumps({"query": what, "index": args.index, "hits": [h.to_dict() for h in hits]}, indent=2))
        return
    width = max([len("path"), *(len(h.path) for h in hits)])
    print(f"{'rank':>4}  {'score':>7}  {'path':<{width}}  caption")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:>7.4f}  {hit.path:<{width}}  {hit.caption or '-'}")


def cmd_curate(args: argparse.Namespace) -> None:
    """Filter an image-text manifest by image-text similarity and remove near-duplicate images."""
    from mmlm.data.curate import CurateSettings, curate

    settings = CurateSettings(
        min_similarity=args.min_similarity,
        keep_fraction=args.keep_fraction,
        dedup_threshold=None if args.no_dedup else args.dedup_threshold,
    )
    settings.check()
    model = load_model(args)
    report = curate(model, args.data, args.out, settings, args.batch_size, args.report)
    counts = report["counts"]
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "dropped"}, indent=2))
        return
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts["dropped_by_reason"].items()) or "none"
    print(f"kept {counts['kept']} of {counts['rows']} pairs -> {args.out}; dropped: {reasons}")
    if report["similarity_threshold"] is not None:
        print(
            f"similarity threshold {report['similarity_threshold']:.4f} ({report['caption_score']} caption)"
        )
    print(f"report -> {report['report']}", file=sys.stderr)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `index`, `search` and `curate` commands."""
    p = subparsers.add_parser("index", help="an image embedding index (FAISS + SQLite)")
    index_sub = p.add_subparsers(dest="what", required=True)
    p = index_sub.add_parser("build", help="embed images into an index; resumes and extends an existing one")
    add_model_args(p)
    p.add_argument("--images", required=True, help="an image folder (searched recursively) or a manifest")
    p.add_argument("--index", required=True, help="the index folder (created if absent)")
    p.add_argument("--ann-threshold", type=int, default=50_000, help="images at which search switches to IVF")
    p.add_argument("--nlist", type=int, help="IVF cells (default about 4·sqrt(images))")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the IVF nprobe is tuned to")
    p.set_defaults(func=cmd_index_build)
    p = index_sub.add_parser("info", help="print what an index holds")
    p.add_argument("--index", required=True, help="the index folder")
    p.set_defaults(func=cmd_index_info)

    p = subparsers.add_parser("search", help="search an image index by text or by image")
    p.add_argument("--index", required=True, help="the index folder")
    p.add_argument("--text", help="a text query")
    p.add_argument("--image", help="an image file as the query")
    p.add_argument("-k", type=int, default=10, help="results to show")
    p.add_argument("--model", help="the model folder or hub id (default: the one that built the index)")
    add_revision_arg(p)
    add_device_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_search)

    p = subparsers.add_parser("curate", help="filter image-text pairs by similarity; drop near-duplicates")
    add_model_args(p)
    p.add_argument("--data", required=True, help="an image-text manifest (.jsonl, .csv, ...)")
    p.add_argument("--out", required=True, help="the filtered JSONL manifest to write")
    # not an argparse exclusive group: CurateSettings.check gives a one-line error rather than a usage block
    p.add_argument("--min-similarity", type=float, help="drop pairs whose image-text cosine is below this")
    p.add_argument("--keep-fraction", type=float, help="keep this fraction of pairs, most similar first")
    p.add_argument(
        "--dedup-threshold", type=float, default=0.95, help="image cosine at which images are duplicates"
    )
    p.add_argument("--no-dedup", action="store_true", help="keep near-duplicate images")
    p.add_argument("--report", help="the JSON report to write (default: OUT with .report.json)")
    p.set_defaults(func=cmd_curate)
