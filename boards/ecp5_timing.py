"""Out-of-context ECP5 timing of the Engine alone (no Link, no board top): where its own limits are.

``python -m mmfree_fpga.boards.ecp5_timing [--lanes 64] [--formats narrow|wide] [--freq 115] [--seed 1]
[--router router2] [--place-only] [--keep DIR]`` builds
the full :class:`~.engine.Engine` for the demo model (or ``--checkpoint``) with the weight image
in block RAM, as on the ULX3S (DP16KD instances with their output register when the store is
banked), inside a wrapper whose every port is a flip-flop (inputs from a
shift register fed 64 bits at a time, outputs registered and folded into 64 registered bits), so
no I/O path is timed; the command interface is the Link's (``index`` 0, ops 0..2). Then YoWASP
Yosys ``synth_ecp5`` (with the board flow's ``rename -hide w:*[[]*``) and ``nextpnr-ecp5 --85k
--package CABGA381 --speed 6 --out-of-context``. It prints nextpnr's final Fmax, the critical path
and the latest-arriving register inputs (from ``--detailed-timing-report``), one per register.
About 6-10 minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from mmfree_fpga.config import FORMAT_SETS

__all__ = ["RegisteredPorts", "run", "summary", "main"]


class RegisteredPorts(wiring.Component):
    """The engine with flip-flops on every port: ``din`` (64 bits a cycle) shifts into the
    inputs, the outputs are registered and folded into ``dout``."""

    def __init__(self, engine):
        self.engine = engine
        super().__init__({"din": In(64), "dout": Out(64)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.engine = e = self.engine
        ins = [e.cmd.valid, e.cmd.payload.op.as_value()[:2], e.cmd.payload.arg, e.load.valid, e.load.payload,
               e.result.ready, e.logit_req.valid, e.logit_req.payload, e.logit_resp.ready]
        sh = Signal(sum(len(x) for x in ins) + 64)
        m.d.sync += sh.eq((sh << 64) | self.din)
        pos = 0
        for x in ins:
            m.d.comb += x.eq(sh[pos:pos + len(x)])
            pos += len(x)
        o = Cat(e.cmd.ready, e.load.ready, e.result.valid, e.result.payload.as_value(), e.logit_req.ready,
                e.logit_resp.valid, e.logit_resp.payload)
        oreg = Signal(len(o))
        m.d.sync += oreg.eq(o)
        folded = 0
        for i in range(0, len(oreg), 64):
            folded = folded ^ oreg[i:i + 64]
        acc = Signal(64)
        m.d.sync += acc.eq(folded)
        m.d.comb += self.dout.eq(acc)
        return m


def run(design, workdir: Path, *, freq: float = 115.0, seed: int = 1, place_only: bool = False,
        router: str | None = None) -> dict:
    """Synthesise and place and route ``design`` out of context in ``workdir``; nextpnr's JSON report
    (``place_only``: without routing, the delays nextpnr estimates after placement; ``router``:
    nextpnr's, None for its own)."""
    from amaranth.back import rtlil

    from .build import YOSYS_AFTER_READ, tool_command
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "top.il").write_text(rtlil.convert(design, name="top"))
    subprocess.run([tool_command("yosys"), "-q", "-l", "top.rpt", "-p",
                    f"read_rtlil top.il; {YOSYS_AFTER_READ}; synth_ecp5 -top top; write_json top.json"],
                   cwd=workdir, check=True)
    subprocess.run([tool_command("nextpnr-ecp5"), "--85k", "--package", "CABGA381",
                    "--speed", "6", "--out-of-context", "--freq", str(freq), "--seed", str(seed),
                    "--json", "top.json", "--report", "report.json", "--detailed-timing-report",
                    "--log", "top.tim", "--timing-allow-fail", "-q"] + (["--no-route"] if place_only else [])
                   + (["--router", router] if router else []),
                   cwd=workdir, check=True)
    return json.loads((workdir / "report.json").read_text())


def _short(name: str) -> str:
    return re.sub(r"_(TRELLIS_FF|LUT4|CCU2C|PFUMX|L6MUX21|MULT18X18D|DPRAM|RAMW).*|\$.*", "", name)


def summary(report: dict, endpoints: int = 20) -> str:
    """Fmax, the critical path (source -> sink, delays, logic levels), the latest register inputs."""
    lines = []
    for clk, f in report["fmax"].items():
        lines.append(f"clock {clk}: Fmax {f['achieved']:.2f} MHz (constraint {f['constraint']} MHz)")
    for cp in report.get("critical_paths", []):
        path = cp["path"]
        logic = sum(1 for s in path if s["type"] == "logic")
        total = sum(s["delay"] for s in path)
        lines.append(f"critical path {total:.2f} ns, {logic} logic levels: "
                     f"{_short(path[0]['from']['cell'])} -> {_short(path[-1]['to']['cell'])}")
        for s in path:
            lines.append(f"  {s['type']:9s} {s['delay']:5.2f}  {_short(s['to']['cell'])}.{s['to']['port']}")
    best = {}
    for net in report.get("detailed_net_timings", []):
        for e in net["endpoints"]:
            d = max(e["delay"]) if isinstance(e["delay"], list) else e["delay"]
            key = _short(e["cell"])
            if key not in best or best[key][0] < d:
                best[key] = (d, _short(net["driver"]), net["port"])
    if best:
        lines.append("latest register inputs (arrival ns, register <- driver):")
        for key, (d, drv, port) in sorted(best.items(), key=lambda kv: -kv[1][0])[:endpoints]:
            lines.append(f"  {d:6.2f}  {key} <- {drv}.{port}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmfree_fpga.boards.ecp5_timing", description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=64)
    ap.add_argument("--freq", type=float, default=115.0, help="nextpnr's target, MHz")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--checkpoint", default=None, help="model directory or export (default: the demo model)")
    ap.add_argument("--keep", default=None, help="directory for the netlists and logs (default: a temporary one)")
    ap.add_argument("--place-only", action="store_true",
                    help="stop after placement: estimated delays, minutes instead of the router's hour on a congested design")
    ap.add_argument("--router", choices=("router1", "router2"), default=None,
                    help="nextpnr's router (default its own, router1; router2 routes the wide engine in minutes)")
    ap.add_argument("--formats", choices=sorted(FORMAT_SETS), default="narrow", help="the engine's number formats")
    args = ap.parse_args(argv)
    from .designs import weight_image
    from mmfree_fpga.hw.engine import Engine, beat_bytes, check_geometry
    from mmfree_fpga.hw.weight_port import RAM_BANK_WORDS
    image = weight_image(args.checkpoint, None, FORMAT_SETS[args.formats])
    check_geometry(image.cfg, args.lanes)
    # the ULX3S's store: DP16KD instances with their output register when banked (as the board
    # build chooses on an ECP5 platform)
    banked = -(-len(image.blob) // beat_bytes(args.lanes)) > RAM_BANK_WORDS
    design = RegisteredPorts(Engine(image.cfg, lanes=args.lanes, packing=image.packing, image=image.blob,
                                    mem_dp16kd=banked, formats=image.formats))
    t0 = time.monotonic()
    if args.keep:
        report = run(design, Path(args.keep), freq=args.freq, seed=args.seed, place_only=args.place_only,
                     router=args.router)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = run(design, Path(tmp), freq=args.freq, seed=args.seed, place_only=args.place_only,
                         router=args.router)
    print(summary(report))
    print(f"(Engine alone, full variant, {args.formats} formats, {args.lanes} lanes, d={image.cfg.d} L={image.cfg.L}, weights in block RAM; "
          f"{'placement estimate, ' if args.place_only else ''}out-of-context ECP5-85F speed 6, seed {args.seed}; {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
