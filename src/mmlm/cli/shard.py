"""`mmlm shard`: write an image-text dataset once as resized webdataset shards (mmlm.data.shards)."""

import argparse
import json
import os


def cmd_shard(args: argparse.Namespace) -> None:
    """Resize every image of a dataset and write the pairs as webdataset shards; print what was written."""
    from mmlm.data.readers import open_pairs
    from mmlm.data.shards import ShardSettings, write_shards

    settings = ShardSettings(size=args.size, quality=args.quality, per_shard=args.per_shard)
    settings.check()
    options = {
        k: v for k in ("image_column", "text_column", "image_root", "split") if (v := getattr(args, k))
    }
    reader = open_pairs(args.data, args.format, **options)
    report = write_shards(reader, args.out, settings, workers=args.workers)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    reasons = ", ".join(f"{n} {r}" for r, n in report["skipped_by_reason"].items()) or "none"
    ratio = report["image_bytes_out"] / max(1, report["image_bytes_in"])
    print(f"wrote {report['samples']} pairs in {report['shards']} shards -> {report['pattern']}")
    print(f"images: shorter side <= {report['size']} px, {ratio:.1%} of the source bytes; skipped: {reasons}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `shard` command."""
    p = subparsers.add_parser("shard", help="write an image-text dataset as resized webdataset shards")
    p.add_argument(
        "--data", required=True, nargs="+", help="a dataset file (.jsonl, .csv, .json, .parquet, .tar)"
    )
    p.add_argument("--format", help="the dataset format when the suffix does not tell it")
    p.add_argument("--image-column", help="CSV/TSV/Parquet: the image column")
    p.add_argument("--text-column", help="CSV/TSV/Parquet: the caption column")
    p.add_argument("--image-root", help="COCO/Karpathy: the image folder")
    p.add_argument("--split", help="Karpathy: the split to write (train, val, test, restval)")
    p.add_argument("--out", required=True, help="the folder for the shards (new or empty)")
    p.add_argument("--size", type=int, default=256, help="the shorter side of every stored image, in pixels")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of resized images")
    p.add_argument("--per-shard", type=int, default=10_000, help="samples per tar shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of a summary")
    p.set_defaults(func=cmd_shard)
