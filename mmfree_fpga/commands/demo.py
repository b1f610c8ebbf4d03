"""``mmfree-fpga demo``: the whole pipeline on the bundled demo model, as ``make demo`` runs it.

Generate the engine's Verilog, compile it with Verilator, start it as a simulated device, load
the weights and stream a prompt through it with the host driver over the serial protocol,
printing the text as it arrives; then the integer reference's text for the same prompt and
sampler, the cycles per token the hardware counted, and what they mean at a board's clock.
"""

from __future__ import annotations

import sys
import time

from ._common import engine_lanes, lanes_help, non_negative_float, non_negative_int

HELP = "the whole pipeline on the demo model: simulated engine (Verilator) + host driver vs the reference"


def add_arguments(p) -> None:
    p.add_argument("--prompt", default="def ", metavar="TEXT")
    p.add_argument("--steps", type=non_negative_int, default=120, metavar="N")
    p.add_argument("--temperature", type=non_negative_float, default=0.7, metavar="T")
    p.add_argument("--top-k", type=non_negative_int, default=40, metavar="K")
    p.add_argument("--seed", type=non_negative_int, default=1)
    p.add_argument("--lanes", type=engine_lanes, default=16, metavar="N",
                   help="lanes of the simulated engine: " + lanes_help(16))
    p.add_argument("--verify", action="store_true",
                   help="after the upload, have the simulated engine read its weight memory back and compare "
                        "the CRC-32 with the image's")


def run(args) -> dict:
    import numpy as np

    from mmfree_fpga.boards.registry import resolve_board
    from mmfree_fpga.hw.tiny_program import TINY_PERF_MODEL
    from mmfree_fpga.reference.steppers import integer_stepper
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.generation import Sampler, decode_text, generate, parse_prompt
    from mmfree_fpga.sim.backends import make_backend
    from mmfree_fpga.host.driver import Driver, describe
    from mmfree_fpga.host.image import WeightImage
    from mmfree_fpga.host.transport import DeviceRunner, pipe_pair
    from mmfree_fpga.hw.engine import check_geometry
    from mmfree_fpga.progress import Progress
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT

    from ._common import stream_printer

    ckpt = args.checkpoint or DEMO_CHECKPOINT
    cfg = ModelConfig.from_checkpoint(ckpt)
    prompt = parse_prompt(args.prompt, None, cfg.V)
    make_sampler = lambda: Sampler(temperature=args.temperature, top_k=args.top_k, seed=args.seed)  # noqa: E731
    make_sampler()
    check_geometry(cfg, args.lanes)   # all before minutes of Verilator
    say = lambda msg: print(msg, flush=True)  # noqa: E731

    say(f"[1/4] the engine's Verilog for d={cfg.d} L={cfg.L} I={cfg.I} V={cfg.V}, {args.lanes} lanes, "
        "compiled with Verilator")
    t0 = time.perf_counter()
    backend = make_backend("rtl", cfg, "base3", None, lanes=args.lanes, log=lambda m: say("      " + m))
    say(f"      ready in {time.perf_counter() - t0:.1f} s")
    host_end, device_end = pipe_pair("demo")
    runner = DeviceRunner(backend, device_end).start()
    try:
        driver = Driver(host_end)
        info = driver.connect(cfg)
        say(f"[2/4] simulated device: {describe(info)}")
        image = WeightImage.from_checkpoint(ckpt, "base3")
        progress = Progress("      loading weights", quiet=False)
        t0 = time.perf_counter()
        try:
            driver.ensure_weights(image, progress=progress, verify=args.verify)
        finally:
            progress.close()
        say(f"      {image.size} bytes of weights sent over the serial protocol in {time.perf_counter() - t0:.1f} s"
            + ("; read back and verified (CRC-32)" if args.verify else ""))
        say(f"[3/4] streaming {args.steps} tokens from the simulated hardware (temperature {args.temperature}, "
            f"top-k {args.top_k}, seed {args.seed}):")
        print("-" * 72)
        on_token = stream_printer(cfg.V)
        sys.stdout.write(bytes(prompt).decode("utf-8", errors="replace"))
        hw_tokens = list(prompt)
        t0 = time.perf_counter()
        for tok in driver.generate(prompt, args.steps, make_sampler()):
            hw_tokens.append(tok)
            on_token(tok)
        wall = time.perf_counter() - t0
        print("\n" + "-" * 72)
        cycles = [c for c in driver.feed_cycles if c]
    finally:
        runner.stop()
        backend.close()

    say("[4/4] the integer reference (reference --integer), same prompt and sampler:")
    _, step = integer_stepper(ckpt)
    ref = generate(step, prompt, args.steps, make_sampler()).tokens
    print("-" * 72)
    print(decode_text(ref, cfg.V))
    print("-" * 72)
    same = ref == hw_tokens
    say(f"hardware and reference tokens identical: {'yes' if same else 'NO'} ({len(ref)} tokens)")
    ideal = cfg.ideal_cycles(args.lanes)
    mean = float(np.mean(cycles)) if cycles else 0.0
    clock = resolve_board("ulx3s-85f").default_clock_hz         # the pipelined engine's board
    tiny_clock = resolve_board("icebreaker").default_clock_hz   # the tiny engine's
    say(f"cycles per token (counted by the engine): {mean:,.0f} mean, ideal {ideal:,.0f} "
        f"(ternary weights / lanes), ratio {mean / ideal:.3f}")
    say(f"simulated {len(cycles)} steps in {wall:.1f} s of wall time (Verilator, host driver and protocol included)")
    tiny = TINY_PERF_MODEL.cycles_per_token(cfg)
    say(f"projected at {clock / 1e6:.0f} MHz: {clock / mean:,.0f} tokens/s for this {args.lanes}-lane engine (the "
        f"ULX3S's build clock); the iCEBreaker runs the tiny engine: {tiny:,.0f} cycles per token, "
        f"{tiny_clock / tiny:,.1f} tokens/s at its {tiny_clock / 1e6:.0f} MHz (README, Boards)")
    return {"tokens": hw_tokens, "reference_tokens": ref, "identical": same, "text": decode_text(hw_tokens, cfg.V),
            "verified": bool(args.verify),
            "cycles_per_token": cycles, "ideal_cycles_per_token": ideal,
            "projected_clock_hz": clock, "projected_tokens_per_s": clock / mean if mean else None}
