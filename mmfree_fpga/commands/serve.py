"""``mmfree-fpga serve``: a simulated engine as a byte stream on 127.0.0.1, until stopped."""

from __future__ import annotations

import signal

from ._common import engine_lanes, int_in, lanes_help, positive_int, tcp_port

HELP = ("expose a simulated engine as a byte stream on 127.0.0.1:PORT, speaking the protocol a board "
        "speaks over its UART (connect with 'mmfree-fpga run --device socket://127.0.0.1:PORT'); "
        "with --waves FILE the rtl backend also writes an FST waveform of the board design")

# the waveform window when --waves-to is left out
WAVES_DEFAULT_CYCLES = 1_000_000


def add_arguments(p) -> None:
    from mmfree_fpga.sim.backends import BACKENDS, MEMORIES
    p.add_argument("--port", type=tcp_port, default=0, metavar="P",
                   help="TCP port on 127.0.0.1 (default 0: a free port; the URL is printed)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="rtl",
                   help="what computes behind the stream: 'rtl' = the engine's generated Verilog in "
                        "Verilator (default); 'model' = the Python device model on the integer reference")
    p.add_argument("--lanes", type=engine_lanes, default=16, metavar="N",
                   help="(rtl, and model with --cycle-model) lanes of the simulated engine: " + lanes_help(16))
    p.add_argument("--packing", choices=("2bit", "base3"), default="base3",
                   help="trit packing the simulated engine decodes (default base3)")
    from mmfree_fpga.config import FORMAT_SETS
    p.add_argument("--formats", choices=tuple(FORMAT_SETS), default="narrow",
                   help="the number formats the simulated engine computes in (default narrow; the host "
                        "exports the image in the formats the device announces)")
    p.add_argument("--memory", choices=MEMORIES, default="bram",
                   help="(rtl) where the simulated engine's weights are: 'bram' = on-chip RAM (default); "
                        "'sdram' = a simulated SDRAM behind the generated LiteDRAM core (the ULX3S's "
                        "IS42S16160 controller with LiteDRAM's SDRAM model): the uploaded image is "
                        "written into it and every token streams its weights from it; 'ddr3' = the "
                        "ECPIX-5's DDR3 (MT41K256M16 behind LiteDRAM's ECP5DDRPHY settings) the same way")
    p.add_argument("--baud", type=positive_int, default=None, metavar="N",
                   help="carry the bytes no faster than a UART of N baud, 8N1, would, each direction on "
                        "its own (e.g. 3000000, the boards' rate, to time an upload as a board would take "
                        "it); default: as fast as the socket and the simulation go")
    p.add_argument("--slots", type=int_in(0, 255), default=None, metavar="N",
                   help="state slots for runs over several devices (protocol 1.2's slice ops: the device "
                        "holds a slice of the layers, takes and gives residuals, N sequences in flight); 0: a "
                        "device without them (default: 4 for the model backend; 0 for rtl, whose build with "
                        "slots has the gateware's slice ops, with any --memory; formats with Q16 int32 residuals only)")
    p.add_argument("--cycle-model", action="store_true",
                   help="(model) report each token's cycles from the performance model of a --lanes engine for "
                        "the slice it runs (default: 0, not counted); the figures are the model's, not a counter")
    p.add_argument("--preload", action="store_true",
                   help="start with the checkpoint's weights loaded (else the first 'run' loads them)")
    p.add_argument("--waves", default=None, metavar="FILE",
                   help="(rtl) dump the board design's signals into this FST file (view it with GTKWave or "
                        "Surfer); needs a Verilator build with tracing, made once per design. Only the "
                        "cycles from --waves-from to --waves-to are dumped; the file is complete once the "
                        "window has passed or serve stopped")
    p.add_argument("--waves-from", type=int, default=0, metavar="CYCLE",
                   help="first clock cycle dumped, counted from reset (default 0). The simulated clock "
                        "runs flat out while the design works, at its nominal rate while a partial frame "
                        "waits, and stops while the design is idle")
    p.add_argument("--waves-to", type=int, default=None, metavar="CYCLE",
                   help=f"first cycle not dumped (default --waves-from + {WAVES_DEFAULT_CYCLES:,}): a "
                        "bound, so that a long session does not fill the disk")


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:   # not the main thread: leave signals alone
        pass


def run(args) -> dict:
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.sim.backends import make_backend
    from mmfree_fpga.host.image import WeightImage
    from mmfree_fpga.host.transport import TcpDeviceServer

    from mmfree_fpga.errors import UserError
    waves = _waves_options(args)
    if args.memory != "bram" and args.backend != "rtl":
        raise UserError(f"--memory {args.memory} simulates the engine's DRAM in the generated Verilog: it needs "
                        f"--backend rtl (the {args.backend} backend has no memory type)")
    if args.checkpoint is None:      # (imported only here: it brings torch, which serving does not need)
        from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    cfg = ModelConfig.from_checkpoint(checkpoint)
    from mmfree_fpga.config import FORMAT_SETS
    formats = FORMAT_SETS[args.formats]
    image = WeightImage.from_checkpoint(checkpoint, args.packing, formats) if args.preload else None
    memory = {"memory": args.memory} if args.backend == "rtl" else {}
    backend = make_backend(args.backend, cfg, args.packing, image, lanes=args.lanes,
                           log=lambda msg: print(msg, flush=True), slots=args.slots, cycle_model=args.cycle_model,
                           formats=formats, **memory, **waves)
    try:
        server = TcpDeviceServer(backend, port=args.port, baud=args.baud)
        print(f"serving on {server.url}", flush=True)
        print(f"  {backend.description}; engine for vocab {cfg.V}, hidden {cfg.d}, {cfg.L} layers, "
              f"intermediate {cfg.I}; weights {'preloaded' if image else 'not loaded'}; Ctrl-C stops", flush=True)
        if args.baud:
            print(f"  the line carries {args.baud:,} baud, 8N1 ({args.baud // 10:,} bytes/s each way)", flush=True)
        if waves:
            print(f"  waveform of cycles {waves['waves_from']:,} to {waves['waves_to']:,} into {waves['waves']}",
                  flush=True)
        _stop_on_sigterm()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
    finally:
        backend.close()
    result = {"url": server.url, "backend": args.backend, **memory, "connections": server.connections,
              "discarded_bytes": server.discarded, "baud": args.baud, "slots": getattr(backend, "slots", None)}
    if waves:
        result.update(waves=str(waves["waves"]), waves_from=waves["waves_from"], waves_to=waves["waves_to"])
    return result


def _waves_options(args) -> dict:
    """The --waves options as backend keywords ({} without --waves), checked."""
    from pathlib import Path

    from mmfree_fpga.errors import UserError
    if args.waves is None:
        if args.waves_to is not None or args.waves_from:
            raise UserError("--waves-from/--waves-to need --waves FILE")
        return {}
    if args.backend != "rtl":
        raise UserError("--waves traces the generated Verilog: it needs --backend rtl")
    path = Path(args.waves)
    if not path.parent.resolve().is_dir():
        raise UserError(f"--waves {args.waves}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"--waves {args.waves} is a folder; give a file name (e.g. serve.fst)")
    start = args.waves_from
    end = args.waves_to if args.waves_to is not None else start + WAVES_DEFAULT_CYCLES
    if start < 0 or end <= start:
        raise UserError(f"--waves-from {start} / --waves-to {end}: need 0 <= from < to (cycles)")
    return {"waves": path.resolve(), "waves_from": start, "waves_to": end}
