"""``mmfree-fpga run``: stream a prompt to an engine (a board or ``serve``) and print what it generates.

With several devices (``--device A,B,C``) the model runs as a pipeline of layer slices
(``host/pipeline.py``): their slices are checked to chain, or planned and loaded, and the host
relays each token's residual from device to device. Several prompts (``--prompt-ids "1,2;3,4"``,
``--prompt-file``) or ``--batch N`` run several sequences, in flight together over several
devices; one device runs them one after another."""

from __future__ import annotations

import sys
import time

from mmfree_fpga.protocol import DEFAULT_BAUD

from ._common import add_generation_arguments, positive_float, positive_int, stream_printer

HELP = ("stream a prompt to a device (a board's serial port or 'mmfree-fpga serve') and print the "
        "generated text as it arrives; loads the weights if the device lacks them")


def add_arguments(p) -> None:
    add_generation_arguments(p)
    p.add_argument("--device", required=True, metavar="URL[,URL...]",
                   help="the device: a serial port (/dev/ttyUSB1) or socket://127.0.0.1:PORT from 'serve'; "
                        "several, comma-separated, run the model as a pipeline of layer slices, device 0 with the "
                        "embedding, the last with the head (checked, or planned and loaded)")
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="prompts, one per line (UTF-8 text; ids as '1,2,3' for models that are not byte-level); "
                        "--prompt-ids also takes several prompts separated by ';'")
    p.add_argument("--batch", type=positive_int, default=None, metavar="N",
                   help="run N sequences: the prompts in turn (one prompt: N copies); over several devices they "
                        "are in flight together, as many at once as the devices have state slots")
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
    urls = [u.strip() for u in args.device.split(",")]
    if any(not u for u in urls):
        raise UserError(f"--device {args.device!r}: an empty URL in the list")
    if len(set(urls)) != len(urls):
        raise UserError(f"--device {args.device!r} names a device twice")
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    cfg = ModelConfig.from_checkpoint(checkpoint)
    prompts = _prompts(args, cfg.V)
    if len(urls) > 1:
        return _run_pipeline(args, urls, checkpoint, cfg, prompts)
    if len(prompts) > 1:
        return _run_one_by_one(args, urls[0], checkpoint, cfg, prompts)
    prompt, sampler = prompts[0], _sampler(args)

    def note(message: str) -> None:
        print(f"mmfree-fpga run: {message}", file=sys.stderr, flush=True)

    driver = Driver.open(args.device, baudrate=args.baud, timeout=args.timeout, log=note)
    try:
        info = driver.connect(cfg, what=f"the checkpoint {checkpoint}")
        if not args.quiet:
            print(f"device {args.device}: {describe(info)}", flush=True)
        image = WeightImage.from_checkpoint(checkpoint, driver.packing, driver.formats)
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


def _sampler(args):
    from mmfree_fpga.generation import Sampler
    return Sampler(temperature=args.temperature, top_k=args.top_k, seed=args.seed)


def _prompts(args, vocab_size: int) -> list[list[int]]:
    """The prompts: --prompt-file's lines, --prompt-ids split at ';', else the one prompt; then
    --batch N of them, in turn."""
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.generation import parse_prompt
    if args.prompt_file is not None:
        if args.prompt is not None or args.prompt_ids is not None:
            raise UserError("give --prompt-file or --prompt/--prompt-ids, not both")
        try:
            lines = [line for line in open(args.prompt_file, encoding="utf-8").read().splitlines() if line]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {args.prompt_file}: {e}") from None
        if not lines:
            raise UserError(f"--prompt-file {args.prompt_file} holds no prompt")
        prompts = [parse_prompt(line, None, vocab_size) if vocab_size >= 256 else parse_prompt(None, line, vocab_size)
                   for line in lines]
    elif args.prompt_ids is not None and ";" in args.prompt_ids:
        prompts = [parse_prompt(None, part, vocab_size) for part in args.prompt_ids.split(";")]
    else:
        prompts = [parse_prompt(args.prompt, args.prompt_ids, vocab_size)]
    if args.batch is not None:
        prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
    return prompts


def _tokens_json(sequences: list[list[int]], vocab_size: int) -> dict:
    from mmfree_fpga.generation import decode_text
    if len(sequences) == 1:
        return {"tokens": sequences[0], "text": decode_text(sequences[0], vocab_size)}
    return {"tokens": sequences, "text": [decode_text(t, vocab_size) for t in sequences]}


def _print_sequences(sequences, prompts, vocab_size: int) -> None:
    from mmfree_fpga.generation import decode_text
    for i, (tokens, prompt) in enumerate(zip(sequences, prompts)):
        text = decode_text(tokens, vocab_size)
        shown = text if text is not None else " ".join(map(str, tokens[len(prompt):]))
        print(f"[{i}] {shown}", flush=True)


def _run_one_by_one(args, url, checkpoint, cfg, prompts) -> dict:
    """Several prompts on one device: each in turn (reset, prompt, steps)."""
    from mmfree_fpga.host.driver import Driver, describe
    from mmfree_fpga.host.image import WeightImage

    def note(message: str) -> None:
        print(f"mmfree-fpga run: {message}", file=sys.stderr, flush=True)

    driver = Driver.open(url, baudrate=args.baud, timeout=args.timeout, log=note)
    try:
        info = driver.connect(cfg, what=f"the checkpoint {checkpoint}")
        if not args.quiet:
            print(f"device {url}: {describe(info)}", flush=True)
        image = WeightImage.from_checkpoint(checkpoint, driver.packing, driver.formats)
        loaded = driver.ensure_weights(image, force=args.force_load, allow_load=not args.no_load, verify=args.verify)
        sequences = []
        t0 = time.perf_counter()
        for prompt in prompts:
            sequences.append(list(prompt) + list(driver.generate(prompt, args.steps, _sampler(args))))
        seconds = time.perf_counter() - t0
    finally:
        driver.close()
    generated = args.steps * len(prompts)
    rate = generated / seconds if seconds > 0 else 0.0
    if not args.quiet:
        _print_sequences(sequences, prompts, cfg.V)
    print(f"{len(prompts)} sequences of {args.steps} tokens in {seconds:.2f} s: {rate:.1f} tokens/s (one device: "
          "one after another)")
    return {**_tokens_json(sequences, cfg.V), "prompts": len(prompts), "tokens_per_s": rate, "seconds": seconds,
            "device": url, "loaded_weights": loaded, "verified": bool(args.verify),
            "image_crc32": f"{image.crc32:08x}", "link": driver.stats.as_dict()}


def _run_pipeline(args, urls, checkpoint, cfg, prompts) -> dict:
    """The model over several devices as a pipeline of layer slices (host/pipeline.py)."""
    from mmfree_fpga.host.pipeline import Pipeline
    from mmfree_fpga.progress import Progress

    def note(message: str) -> None:
        print(f"mmfree-fpga run: {message}", file=sys.stderr, flush=True)

    with Pipeline(urls, cfg, checkpoint, baudrate=args.baud, timeout=args.timeout, log=note) as pipe:
        progress = Progress("loading slices", quiet=args.quiet, unit="B", unit_scale=True)
        t_load = time.perf_counter()
        try:
            planned = pipe.prepare(force=args.force_load, allow_load=not args.no_load, verify=args.verify,
                                   progress=progress, model=str(checkpoint))
        finally:
            progress.close()
        load_s = time.perf_counter() - t_load
        how = "planned (planner: the devices' capacity, compute cycles)" if planned else "as the devices hold it"
        print(f"split over {len(urls)} devices, {how}:", flush=True)
        for line in pipe.split_text():
            print(f"  {line}", flush=True)
        streaming = len(prompts) == 1
        if streaming and cfg.V == 256:
            sys.stdout.write(bytes(prompts[0]).decode("utf-8", errors="replace"))
            sys.stdout.flush()
        printer = stream_printer(cfg.V)
        result = pipe.run(prompts, args.steps, sampler=lambda: _sampler(args),
                          on_token=(lambda i, token: printer(token)) if streaming else None)
        if streaming:
            sys.stdout.write("\n")
        elif not args.quiet:
            _print_sequences(result.tokens, prompts, cfg.V)
        cycles = ""
        if result.makespan_cycles:
            cycles = (f"; {result.makespan_cycles:,} device cycles for {result.feeds} tokens through the chain: "
                      f"{result.tokens_per_mcycle:,.1f} per million cycles")
        print(f"{result.generated} tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s over "
              f"{len(urls)} devices, {result.in_flight} sequences in flight{cycles}", flush=True)
        return {**_tokens_json(result.tokens, cfg.V), "prompts": len(prompts), "tokens_per_s": result.tokens_per_s,
                "seconds": result.seconds, "devices": [s.as_dict() for s in pipe.stages], "split_planned": planned,
                "load_seconds": load_s, "verified": bool(args.verify), "in_flight": result.in_flight,
                "device_cycles": result.device_cycles, "pipeline_cycles": result.makespan_cycles,
                "tokens_through_chain": result.feeds, "tokens_per_mcycle": result.tokens_per_mcycle}
