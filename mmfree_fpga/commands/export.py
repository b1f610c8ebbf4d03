"""``mmfree-fpga export``: the weight image the hardware reads."""

from __future__ import annotations

from pathlib import Path

HELP = "write the weight image (packed trits, scales, norm vectors, embeddings) and its manifest"


def add_arguments(p) -> None:
    p.add_argument("--packing", choices=("2bit", "base3"), default="base3",
                   help="trit packing: 2 bits per trit or 5 trits per byte (default base3)")
    p.add_argument("--out", default="out/export", metavar="DIR", help="output directory (default out/export)")


def run(args) -> dict:
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint
    from mmfree_fpga.reference.export import integer_weights, write_image

    from ._common import check_out_dir
    check_out_dir(args.out)
    cfg, tensors = load_checkpoint(args.checkpoint or DEMO_CHECKPOINT)
    manifest = write_image(integer_weights(cfg, tensors), args.out, args.packing)
    out = Path(args.out)
    print(f"wrote {out / 'weights.bin'} ({manifest['bytes']} bytes) and {out / 'manifest.json'}")
    print(f"{cfg.ternary_weights} ternary weights at {manifest['bits_per_weight']} bits/weight "
          f"({manifest['packing']}): {manifest['ternary_bytes']} bytes; embeddings {manifest['embedding_bytes']} bytes")
    return {"files": [str(out / f) for f in manifest["files"]], "bits_per_weight": manifest["bits_per_weight"],
            "bytes": manifest["bytes"], "ternary_bytes": manifest["ternary_bytes"], "packing": manifest["packing"],
            "sha256": manifest["sha256"]}
