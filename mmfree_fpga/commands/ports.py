"""``mmfree-fpga ports``: the serial ports of this machine, and which look like a known board."""

from __future__ import annotations

HELP = ("list this machine's serial ports (pyserial), marking those whose USB id is a known board's; "
        "pass one to 'mmfree-fpga run --device PORT'")


def add_arguments(p) -> None:
    p.add_argument("--all", action="store_true",
                   help="also list ports without a USB or other hardware id (legacy ttyS ports)")


def board_for_usb_id(vid: int | None, pid: int | None) -> list[str]:
    """Names of the known boards whose USB bridge has this vendor/product id."""
    from mmfree_fpga.boards.registry import BOARDS
    return [b.name for b in BOARDS.values()
            if b.programmer is not None and b.programmer.usb_id is not None and b.programmer.usb_id == (vid, pid)]


def run(args) -> dict:
    from serial.tools import list_ports

    ports = []
    for p in sorted(list_ports.comports(include_links=False), key=lambda p: p.device):
        if not args.all and p.hwid in (None, "", "n/a"):
            continue
        ports.append({
            "device": p.device, "description": p.description, "hwid": p.hwid,
            "vid": p.vid, "pid": p.pid, "serial_number": p.serial_number,
            "boards": board_for_usb_id(p.vid, p.pid),
        })
    if not args.quiet:
        if not ports:
            print("no serial ports found" + ("" if args.all else " (--all lists ports without a hardware id too)")
                  + "; a simulated board: 'mmfree-fpga serve', then --device socket://127.0.0.1:PORT")
        for p in ports:
            usb = f" USB {p['vid']:04x}:{p['pid']:04x}" if p["vid"] is not None and p["pid"] is not None else ""
            hint = f"  <- {', '.join(p['boards'])}" if p["boards"] else ""
            print(f"{p['device']}  {p['description']}{usb}{hint}")
    return {"ports": ports}
