"""``mmfree-fpga proxy``: a fault injector between a host and a device, until stopped."""

from __future__ import annotations

import time

HELP = ("put a noisy line between a host and a device: forward 127.0.0.1:PORT to a device's port "
        "(e.g. 'mmfree-fpga serve'), corrupting, dropping, duplicating and delaying bytes and frames "
        "and adding garbage, at reproducible (seeded) rates; the URL to give 'run --device' is printed")


def _fault_names() -> list[str]:
    import dataclasses

    from mmfree_fpga.host.faults import FaultConfig
    # the rates (probabilities); reset needs the device in the same process, so it is not offered
    return [f.name for f in dataclasses.fields(FaultConfig) if f.type in ("float", float)
            and f.name not in ("max_delay_s", "reset")]


def _noisy_mix() -> str:
    """What --rate R sets (FaultConfig.noisy), in words."""
    import dataclasses

    from mmfree_fpga.host.faults import FaultConfig
    unit = FaultConfig.noisy(1.0)
    return ", ".join(f"{f.name} {getattr(unit, f.name):g}R" for f in dataclasses.fields(unit)
                     if f.name in _fault_names() and getattr(unit, f.name))


def add_arguments(p) -> None:
    from mmfree_fpga.host.faults import FaultConfig
    p.add_argument("--target", required=True, metavar="URL",
                   help="the device's port: socket://127.0.0.1:P (what 'serve' prints) or just P")
    p.add_argument("--port", type=int, default=0, metavar="P",
                   help="TCP port on 127.0.0.1 to listen on (default 0: a free port; the URL is printed)")
    p.add_argument("--rate", type=float, default=0.01, metavar="R",
                   help=f"fault rate in both directions, the probabilities {_noisy_mix()} (per byte or "
                        "per frame; default 0.01; 0 passes everything unchanged)")
    p.add_argument("--to-device-rate", type=float, default=None, metavar="R",
                   help="the rate host -> device (default --rate)")
    p.add_argument("--to-host-rate", type=float, default=None, metavar="R",
                   help="the rate device -> host (default --rate)")
    p.add_argument("--fault", action="append", default=[], metavar="NAME=P",
                   help="set one fault probability in both directions, after the rates (repeatable); NAME "
                        f"one of {', '.join(_fault_names())}")
    p.add_argument("--max-delay", type=float, default=None, metavar="S",
                   help=f"longest hold-back of a delayed frame in seconds (default {FaultConfig().max_delay_s:g})")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the fault draws: the same seed and traffic give the same faults (default 0)")


def _target_port(text: str) -> int:
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.host.transport import require_loopback
    spec = text.strip()
    host = "127.0.0.1"
    if spec.startswith("socket://"):
        host, sep, spec = spec[len("socket://"):].rpartition(":")
        if not sep:
            raise UserError(f"--target {text!r}: expected socket://127.0.0.1:PORT or a port number")
        require_loopback(host)
    try:
        port = int(spec)
    except ValueError:
        raise UserError(f"--target {text!r}: expected socket://127.0.0.1:PORT or a port number") from None
    if not 1 <= port <= 65535:
        raise UserError(f"--target port {port} is not a TCP port (1..65535)")
    return port


def _rate(name: str, value: float) -> float:
    from mmfree_fpga.errors import UserError
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name} {value} is not a probability (0..1)")
    return value


def _configs(args):
    from mmfree_fpga.errors import UserError
    from mmfree_fpga.host.faults import FaultConfig
    rate = _rate("--rate", args.rate)
    down = _rate("--to-device-rate", args.to_device_rate if args.to_device_rate is not None else rate)
    up = _rate("--to-host-rate", args.to_host_rate if args.to_host_rate is not None else rate)
    overrides = {}
    names = _fault_names()
    for item in args.fault:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in names:
            raise UserError(f"--fault {item!r}: expected NAME=P with NAME one of {', '.join(names)}")
        try:
            overrides[name] = _rate(f"--fault {name}", float(value))
        except ValueError:
            raise UserError(f"--fault {item!r}: {value!r} is not a number") from None
    if args.max_delay is not None:
        if not 0.0 <= args.max_delay <= 10.0:
            raise UserError(f"--max-delay {args.max_delay} must be in 0..10 seconds")
        overrides["max_delay_s"] = args.max_delay
    return FaultConfig.noisy(down, **overrides), FaultConfig.noisy(up, **overrides)


def run(args) -> dict:
    import dataclasses
    import socket

    from mmfree_fpga.errors import UserError
    from mmfree_fpga.host.faults import TcpFaultProxy

    from .serve import _stop_on_sigterm

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a TCP port (0..65535)")
    target = _target_port(args.target)
    to_device, to_host = _configs(args)
    try:
        socket.create_connection(("127.0.0.1", target), timeout=2).close()
    except OSError as e:
        raise UserError(f"nothing listens at 127.0.0.1:{target} ({e.strerror or e}); start the device first "
                        "('mmfree-fpga serve --port P') and give its port") from None
    with TcpFaultProxy(target, to_device, to_host, port=args.port, seed=args.seed) as proxy:
        print(f"proxy on {proxy.url} -> socket://127.0.0.1:{target}", flush=True)
        print(f"  faults (seed {args.seed}): to the device {_describe(to_device)}; to the host "
              f"{_describe(to_host)}; Ctrl-C stops", flush=True)
        _stop_on_sigterm()
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        stats = dict(proxy.link_stats())
        print(f"stopped; {proxy.clients} clients, {stats.get('frames', 0)} frames, "
              f"{stats.get('bytes_corrupted', 0)} bytes corrupted, {stats.get('frames_dropped', 0)} frames dropped",
              flush=True)
        return {"url": proxy.url, "target": f"socket://127.0.0.1:{target}", "seed": args.seed,
                "to_device": dataclasses.asdict(to_device), "to_host": dataclasses.asdict(to_host),
                "clients": proxy.clients, "stats": stats}


def _describe(config) -> str:
    import dataclasses
    rates = [f"{f.name} {getattr(config, f.name):g}" for f in dataclasses.fields(config)
             if f.name in _fault_names() and getattr(config, f.name)]
    return ", ".join(rates) or "none"
