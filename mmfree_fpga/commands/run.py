"""``mmfree-fpga run``: stream a prompt to an engine (a board or ``serve``) and print what it generates."""

from __future__ import annotations

import sys
import time

from mmfree_fpga.protocol import DEFAULT_BAUD

from ._common import add_generation_arguments, positive_float, positive_int, prompt_and_sampler, stream_printer

HELP = ("stream a prompt to a device (a board's serial port or 'mmfree-fpga serve') and print the "
        "generated text as it arrives; loads the weights if the device lacks them")


def add_arguments(p) -> None:
    add_generation_arguments(p)
    p.add_argument("--device", required=True, metavar="URL",
                   help="the device: a serial port (/dev/ttyUSB1) or socket://127.0.0.1:PORT from 'serve'")
    p.add_argument("--baud", type=positive_int, default=DEFAULT_BAUD, metavar="N",
                   help=f"serial baud rate, the boards' UART rate unless built otherwise (default {DEFAULT_BAUD})")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                   help="fixed response timeout in seconds (default: adapts to the measured round trip)")
    p.add_argument("--no-load", action="store_true",
                   help="fail instead of loading the weights when the device lacks them or holds others")
    p.add_argument("--force-load", action="store_true",
                   help="load the weights from byte 0 even if the device holds them (or part of them)")
    p.add_argument("--verify", action="store_true",
                   help="after loading (or finding the weights loaded) have the device read its weight memory "
                        "back and compare the CRC-32 with the image's; a mismatch is an error")


def run(args) -> dict:
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.generation import decode_text
    from mmfree_fpga.host.driver import Driver, describe
    from mmfree_fpga.host.image import WeightImage
    from mmfree_fpga.progress import Progress
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT

    if args.no_load and args.force_load:
        raise UserError("give either --no-load or --force-load, not both")
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    cfg = ModelConfig.from_checkpoint(checkpoint)
    prompt, sampler = prompt_and_sampler(args, cfg.V)

    def note(message: str) -> None:
        print(f"mmfree-fpga run: {message}", file=sys.stderr, flush=True)

    driver = Driver.open(args.device, baudrate=args.baud, timeout=args.timeout, log=note)
    try:
        info = driver.connect(cfg, what=f"the checkpoint {checkpoint}")
        if not args.quiet:
            print(f"device {args.device}: {describe(info)}", flush=True)
        image = WeightImage.from_checkpoint(checkpoint, driver.packing)
        progress = Progress("loading weights", quiet=args.quiet, unit="B", unit_scale=True)
        t_load = time.perf_counter()
        try:
            loaded = driver.ensure_weights(image, force=args.force_load, allow_load=not args.no_load,
                                           progress=progress, verify=args.verify)
        finally:
            progress.close()
        load_s = time.perf_counter() - t_load
        resumed = driver.stats.resumed_bytes
        if loaded and not args.quiet:
            sent = image.size - resumed
            how = f" (resumed at byte {resumed:,}: {sent:,} bytes sent)" if resumed else ""
            print(f"loaded {image.size:,} bytes of weights (CRC-32 {image.crc32:08x}) in {load_s:.2f} s{how}",
                  flush=True)
        if args.verify and not args.quiet:
            print(f"verified: the device read back {image.size:,} bytes with the image's CRC-32", flush=True)

        on_token = stream_printer(cfg.V)
        if cfg.V == 256:
            sys.stdout.write(bytes(prompt).decode("utf-8", errors="replace"))
            sys.stdout.flush()
        tokens = list(prompt)
        t0 = time.perf_counter()
        for token in driver.generate(prompt, args.steps, sampler):
            tokens.append(token)
            on_token(token)
        seconds = time.perf_counter() - t0
        sys.stdout.write("\n")
        rate = args.steps / seconds if seconds > 0 else 0.0
        print(f"{args.steps} tokens in {seconds:.2f} s: {rate:.1f} tokens/s (prompt of {len(prompt)} "
              f"included; {driver.stats.retransmits} retransmissions, {driver.stats.recoveries} recoveries)")
    finally:
        driver.close()
    return {
        "tokens": tokens, "text": decode_text(tokens, cfg.V), "tokens_per_s": rate, "seconds": seconds,
        "device": args.device, "loaded_weights": loaded, "load_seconds": load_s, "resumed_from": resumed,
        "verified": bool(args.verify),
        "image_crc32": f"{image.crc32:08x}", "link": driver.stats.as_dict(),
    }
