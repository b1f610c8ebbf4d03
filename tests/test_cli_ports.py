"""`mmfree-fpga ports` and the serial line's one baud rate."""

import json

from serial.tools import list_ports, list_ports_common

from mmfree_fpga.boards.registry import BOARDS
from mmfree_fpga.cli import build_parser, main
from mmfree_fpga.protocol import DEFAULT_BAUD


def _port(device, vid=None, pid=None, description="n/a"):
    info = list_ports_common.ListPortInfo(device, skip_link_detection=True)
    info.description = description
    if vid is not None:
        info.vid, info.pid, info.serial_number = vid, pid, "FT123"
        info.hwid = info.usb_info()
    return info


def test_ports_marks_known_boards(monkeypatch, tmp_path, capsys):
    ulx3s = BOARDS["ulx3s-85f"].programmer.usb_id
    fake = [_port("/dev/ttyUSB0", *ulx3s, description="FT231X USB UART"),
            _port("/dev/ttyACM0", 0x1234, 0x5678, description="some modem"),
            _port("/dev/ttyS0")]
    monkeypatch.setattr(list_ports, "comports", lambda include_links=False: fake)
    out = tmp_path / "ports.json"
    assert main(["ports", "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "/dev/ttyUSB0" in text and "<- ulx3s-85f" in text and "/dev/ttyACM0" in text
    assert "/dev/ttyS0" not in text                       # no hardware id: only with --all
    ports = json.loads(out.read_text())["ports"]
    assert [p["boards"] for p in ports] == [[], ["ulx3s-85f"]]      # sorted by device
    assert ports[1]["device"] == "/dev/ttyUSB0" and (ports[1]["vid"], ports[1]["pid"]) == ulx3s

    assert main(["ports", "--all", "--json-out", str(out)]) == 0
    assert "/dev/ttyS0" in [p["device"] for p in json.loads(out.read_text())["ports"]]


def test_ports_says_what_to_do_without_any(monkeypatch, capsys):
    monkeypatch.setattr(list_ports, "comports", lambda include_links=False: [])
    assert main(["ports"]) == 0
    assert "no serial ports found" in capsys.readouterr().out


def test_run_speaks_the_boards_baud_by_default():
    from mmfree_fpga.boards.top import UARTBridge
    args = build_parser().parse_args(["run", "--device", "socket://127.0.0.1:1"])
    assert args.baud == DEFAULT_BAUD == UARTBridge.__init__.__kwdefaults__["baud"]
    build_args = build_parser().parse_args(["build", "--board", "icebreaker"])
    assert build_args.baud == DEFAULT_BAUD
