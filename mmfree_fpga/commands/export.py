"""``mmfree-fpga export``: the weight image the hardware reads."""

from __future__ import annotations

from pathlib import Path

from ._common import formats_choices_text

HELP = "write the weight image (packed trits, scales, norm vectors, embeddings) and its manifest"


def default_formats_name() -> str:
    """The name in ``FORMAT_SETS`` of the formats the hardware is built with (``FORMATS``)."""
    from mmfree_fpga.config import FORMAT_SETS, FORMATS
    return next(name for name, fmt in FORMAT_SETS.items() if fmt == FORMATS)


def add_formats_argument(p, what: str, default_note: str = "") -> None:
    """``--formats NAME``: a number format set of ``FORMAT_SETS`` (default: the hardware's)."""
    from mmfree_fpga.config import FORMAT_SETS
    p.add_argument("--formats", choices=tuple(FORMAT_SETS), default=None,
                   help=f"number formats of {what} (default {default_formats_name()}, the simulators' and the "
                        f"iCE40's{default_note}; a board's build names its own set): " + formats_choices_text())


def formats_of(args):
    """(name, Formats) chosen by ``--formats``."""
    from mmfree_fpga.config import FORMAT_SETS
    name = args.formats or default_formats_name()
    return name, FORMAT_SETS[name]


def add_arguments(p) -> None:
    p.add_argument("--packing", choices=("2bit", "base3"), default="base3",
                   help="trit packing: 2 bits per trit or 5 trits per byte (default base3)")
    add_formats_argument(p, "the image (element sizes follow them; the manifest records them)")
    p.add_argument("--out", default="out/export", metavar="DIR", help="output directory (default out/export)")


def run(args) -> dict:
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT, load_checkpoint
    from mmfree_fpga.reference.export import integer_weights, write_image

    from ._common import check_out_dir
    check_out_dir(args.out)
    name, fmt = formats_of(args)
    cfg, tensors = load_checkpoint(args.checkpoint or DEMO_CHECKPOINT)
    manifest = write_image(integer_weights(cfg, tensors, fmt), args.out, args.packing)
    out = Path(args.out)
    print(f"wrote {out / 'weights.bin'} ({manifest['bytes']} bytes) and {out / 'manifest.json'}")
    print(f"{cfg.ternary_weights} ternary weights at {manifest['bits_per_weight']} bits/weight "
          f"({manifest['packing']}): {manifest['ternary_bytes']} bytes; embeddings {manifest['embedding_bytes']} "
          f"bytes; number formats {name}")
    return {"files": [str(out / f) for f in manifest["files"]], "bits_per_weight": manifest["bits_per_weight"],
            "bytes": manifest["bytes"], "ternary_bytes": manifest["ternary_bytes"], "packing": manifest["packing"],
            "sha256": manifest["sha256"], "formats": name}
