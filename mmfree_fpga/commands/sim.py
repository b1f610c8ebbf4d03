"""``mmfree-fpga sim``: run the engine's generated Verilog on a prompt, count cycles per token."""

from __future__ import annotations

import sys

from mmfree_fpga.config import FORMAT_SETS
from mmfree_fpga.errors import UserError

from ._common import (add_generation_arguments, check_out_file, engine_lanes, float_in, formats_choices_text, int_in,
                      lanes_help, non_negative_int, probability, prompt_and_sampler)

HELP = "simulate the engine's Verilog on a prompt (greedy); cycles per token against the ideal"


def add_arguments(p) -> None:
    add_generation_arguments(p)
    p.add_argument("--lanes", type=engine_lanes, default=16, metavar="N", help=lanes_help(16))
    p.add_argument("--packing", choices=("base3", "2bit"), default="base3", help="trit packing of the image (default base3)")
    p.add_argument("--simulator", choices=("verilator", "icarus", "amaranth"), default="verilator",
                   help="simulator (default verilator)")
    p.add_argument("--formats", choices=tuple(FORMAT_SETS), default="narrow",
                   help="the number formats the engine is built with and the checkpoint exported in (default "
                        f"narrow): {formats_choices_text()}; the logits the interface reports are Q16 either way")
    p.add_argument("--memory", choices=("bram", "sdram", "ddr3"), default="bram",
                   help="where the weights are: bram, an on-chip store with the memory model below (default); "
                        "sdram, the ULX3S's SDRAM (IS42S16160, 50 MHz) or ddr3, the ECPIX-5's DDR3 (MT41K256M16, "
                        "ECP5DDRPHY settings, 75 MHz), each behind a generated LiteDRAM controller with LiteDRAM's "
                        "SDRAM model (Verilator only; the image is written through the engine's load stream first)")
    p.add_argument("--stall-rate", type=probability, default=0.0, metavar="P",
                   help="probability of a stall cycle on the weight memory's responses (default 0)")
    p.add_argument("--mem-bandwidth", type=float_in(0.0, 255.0), default=0.0, metavar="B",
                   help="weight memory bandwidth in bytes/cycle (default 0: one beat of lanes/4 bytes per cycle)")
    p.add_argument("--mem-latency", type=int_in(1, 60), default=1, metavar="L", help="weight memory latency in cycles (default 1)")
    p.add_argument("--synthetic", action="store_true",
                   help="pseudo-random weights made up by the memory model (cycle counts only; the tokens are meaningless)")
    p.add_argument("--waves", default=None, metavar="FILE",
                   help="write a waveform: FST from Verilator (a separate tracing build, made once), VCD from "
                        "Amaranth, VCD or FST (by the suffix) from Icarus")
    p.add_argument("--waves-from", type=non_negative_int, default=None, metavar="N",
                   help="first clock cycle in the waveform (cycle 0 is the first reset cycle; default 0). "
                        "Amaranth's file always starts at cycle 0")
    p.add_argument("--waves-to", type=non_negative_int, default=None, metavar="M",
                   help="the waveform stops before clock cycle M (default: the end of the run)")


def run(args) -> dict:
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.hw.engine import check_geometry
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    from mmfree_fpga.sim.engine_sim import Waves, check_waves, load_image, reference_tokens, run_engine

    if args.temperature > 0:
        raise UserError("sim decodes greedily (the engine's argmax); leave --temperature at 0")
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    waves = None
    if args.waves is None:
        if args.waves_from is not None or args.waves_to is not None:
            raise UserError("--waves-from and --waves-to need --waves FILE")
    else:
        waves = Waves(check_out_file(args.waves, "--waves"), args.waves_from or 0, args.waves_to)
        check_waves(waves, args.simulator)
    if args.memory != "bram":
        from mmfree_fpga.boards.litedram import litedram_available
        if args.simulator != "verilator":
            raise UserError(f"--memory {args.memory} runs on Verilator only; use --simulator verilator")
        if args.synthetic:
            raise UserError(f"--memory {args.memory} needs real weights (they are loaded into the DRAM); "
                            "drop --synthetic")
        if args.stall_rate or args.mem_bandwidth or args.mem_latency != 1:
            raise UserError("--stall-rate, --mem-bandwidth and --mem-latency set the block-RAM memory model; "
                            f"with --memory {args.memory} LiteDRAM's SDRAM model sets the timing")
        if not litedram_available():
            raise UserError(f"--memory {args.memory} needs LiteDRAM: pip install litedram==2024.12 litex==2024.12 "
                            "migen==0.10.0 (the project's dependencies; 'make install' installs them)")
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    if args.synthetic:
        cfg, blob = ModelConfig.from_checkpoint(checkpoint), None
        if args.simulator == "amaranth":
            raise UserError("--synthetic needs --simulator verilator or icarus")
    else:
        cfg, blob = load_image(checkpoint, args.packing, args.formats)
    check_geometry(cfg, args.lanes)
    prompt, _ = prompt_and_sampler(args, cfg.V)
    r = run_engine(cfg=cfg, blob=blob, packing=args.packing, lanes=args.lanes, prompt=prompt, steps=args.steps,
                   simulator=args.simulator, stall_rate=args.stall_rate, mem_bandwidth=args.mem_bandwidth,
                   mem_latency=args.mem_latency, synthetic=args.synthetic, waves=waves, memory=args.memory,
                   formats=args.formats, progress=not args.quiet,
                   log=None if args.quiet else lambda msg: print(f"sim: {msg}", flush=True))
    ideal = cfg.ideal_cycles(args.lanes)
    if r.sim_cycles and r.sim_wall_s:
        cycles_per_s = r.sim_cycles / r.sim_wall_s
    else:
        cycles_per_s = sum(r.cycles) / r.sim_seconds if r.sim_seconds else None
    result = {
        "tokens": r.tokens,
        "cycles_per_token": r.cycles,
        "ideal_cycles_per_token": ideal,
        "ratio_to_ideal": max(r.cycles) / ideal,
        "sim_cycles_per_s": cycles_per_s,
        "sim_cycles": r.sim_cycles,
        "simulator": r.simulator,
        "lanes": args.lanes,
        "packing": args.packing,
        "formats": args.formats,
        "geometry": cfg.as_dict(),
        "synthetic_weights": bool(args.synthetic),
        "argmax_logits": r.argmax_logits,
        "memory": args.memory,
        "mem": None if args.memory != "bram" else {"bandwidth_bytes_per_cycle": args.mem_bandwidth or None,
                                                    "latency": args.mem_latency, "stall_rate": args.stall_rate},
        "dram_efficiency": r.dram["efficiency"] if r.dram else None,
        "dram": r.dram,
        "waves": None,
    }
    if waves is not None:
        result["waves"] = {"file": str(waves.path), "format": waves.path.suffix.lower()[1:],
                           "from_cycle": 0 if args.simulator == "amaranth" else waves.first, "to_cycle": waves.end}
    if blob is not None:
        ref, _ = reference_tokens(cfg, blob, args.packing, prompt, args.steps, args.formats)
        result["matches_integer_model"] = ref == r.tokens
    if not args.quiet:
        kind = "synthetic weights: " if args.synthetic else ""
        print(f"{kind}tokens {r.tokens}")
        print(f"cycles/token {min(r.cycles)}..{max(r.cycles)}, ideal {ideal:.0f} "
              f"({result['ratio_to_ideal']:.3f}x), {r.simulator} at {result['sim_cycles_per_s'] or 0:.0f} cycles/s")
        if r.dram:
            d = r.dram
            print(f"{args.memory}: weights at {d['efficiency']:.3f} of {d['port_bytes_per_cycle']} bytes/cycle while "
                  f"streaming ({d['weight_bytes']} bytes in {d['weight_cycles']} cycles, "
                  f"{d['memory_utilisation']:.3f} of the memory's peak {d['peak_bytes_per_cycle']} bytes/cycle); "
                  f"image of {d['load_bytes']} bytes loaded in {d['load_cycles']} cycles after an init "
                  f"sequence of {d['init_cycles']}")
        if waves is not None:
            print(f"waveform in {waves.path}")
        if "matches_integer_model" in result:
            print("matches the integer model" if result["matches_integer_model"] else "DIFFERS from the integer model",
                  file=sys.stdout)
    return result
