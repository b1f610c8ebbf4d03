"""``mmfree-fpga serve``: a simulated engine as a byte stream on 127.0.0.1, until stopped."""

from __future__ import annotations

import signal

HELP = ("expose a simulated engine as a byte stream on 127.0.0.1:PORT, speaking the protocol a board "
        "speaks over its UART (connect with 'mmfree-fpga run --device socket://127.0.0.1:PORT')")


def add_arguments(p) -> None:
    from mmfree_fpga.host.backends import BACKENDS
    p.add_argument("--port", type=int, default=0, metavar="P",
                   help="TCP port on 127.0.0.1 (default 0: a free port; the URL is printed)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="rtl",
                   help="what computes behind the stream: 'rtl' = the engine's generated Verilog in "
                        "Verilator (default); 'model' = the Python device model on the integer reference")
    p.add_argument("--lanes", type=int, default=16, help="lanes of the simulated engine (rtl; default 16)")
    p.add_argument("--packing", choices=("2bit", "base3"), default="base3",
                   help="trit packing the simulated engine decodes (default base3)")
    p.add_argument("--preload", action="store_true",
                   help="start with the checkpoint's weights loaded (else the first 'run' loads them)")


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:   # not the main thread: leave signals alone
        pass


def run(args) -> dict:
    from mmfree_fpga.config import ModelConfig
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.host.backends import make_backend
    from mmfree_fpga.host.image import WeightImage
    from mmfree_fpga.host.transport import TcpDeviceServer
    from mmfree_fpga.reference.checkpoint import DEMO_CHECKPOINT

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port (0..65535)")
    checkpoint = args.checkpoint or DEMO_CHECKPOINT
    cfg = ModelConfig.from_checkpoint(checkpoint)
    image = WeightImage.from_checkpoint(checkpoint, args.packing) if args.preload else None
    backend = make_backend(args.backend, cfg, args.packing, image, lanes=args.lanes,
                           log=lambda msg: print(msg, flush=True))
    try:
        server = TcpDeviceServer(backend, port=args.port)
        print(f"serving on {server.url}", flush=True)
        print(f"  {backend.description}; engine for vocab {cfg.V}, hidden {cfg.d}, {cfg.L} layers, "
              f"intermediate {cfg.I}; weights {'preloaded' if image else 'not loaded'}; Ctrl-C stops", flush=True)
        _stop_on_sigterm()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)
    finally:
        backend.close()
    return {"url": server.url, "backend": args.backend, "connections": server.connections}
