"""A behavioural Verilog model of the ECP5 block RAM ``DP16KD`` for simulating ECP5 netlists.

Yosys ships ``DP16KD`` only as a blackbox (share/lattice/cells_sim_ecp5.v), so simulations of
the ECP5 weight store (hw/weight_port.py ``_dp16kd_store``) and of Yosys's own ECP5 netlists use
this model. It covers what those use: the x18 mode (``DATA_WIDTH_A/B`` = 18: word address on
AD[13:4], byte write enables on AD[1:0]), ``INITVAL_xx`` (16 words of 18 bits in 20-bit slots,
the layout of Yosys's share/lattice/brams_map_16kd.v), ``WRITEMODE`` NORMAL, WRITETHROUGH and
READBEFOREWRITE, ``REGMODE`` NOREG and OUTREG (the output register, clocked by CLK, enabled by
OCE), RSTx that clears the output synchronously with ``RESETMODE`` SYNC (with ASYNC, which
Yosys's mapping sets, RSTx must stay low), CSDECODE 0b000 with CSx low. Any other
configuration stops the simulation with a message rather than being modelled wrongly.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DP16KD_MODEL", "write_dp16kd_model"]


def _initvals() -> str:
    return "".join(f"    parameter [319:0] INITVAL_{j:02X} = 320'h0;\n" for j in range(64))


def _init_loop() -> str:
    return "".join(f"        load({j}, INITVAL_{j:02X});\n" for j in range(64))


def _bits(prefix: str, n: int) -> str:
    return "{" + ", ".join(f"{prefix}{k}" for k in reversed(range(n))) + "}"


def _port(p: str) -> str:
    return f"""
    wire [13:0] ad{p} = {_bits("AD" + p, 14)};
    wire [17:0] di{p} = {_bits("DI" + p, 18)};
    reg [17:0] arr{p} = 18'h0;         // the RAM array's read latch
    reg [17:0] out{p} = 18'h0;         // the output register
    always @(posedge CLK{p}) begin
        if (CE{p}) begin
            if (WE{p}) begin
                if (ad{p}[0]) mem[ad{p}[13:4]][8:0] <= di{p}[8:0];
                if (ad{p}[1]) mem[ad{p}[13:4]][17:9] <= di{p}[17:9];
                if (WRITEMODE_{p} == "WRITETHROUGH")
                    arr{p} <= {{ad{p}[1] ? di{p}[17:9] : mem[ad{p}[13:4]][17:9], ad{p}[0] ? di{p}[8:0] : mem[ad{p}[13:4]][8:0]}};
                else if (WRITEMODE_{p} == "READBEFOREWRITE")
                    arr{p} <= mem[ad{p}[13:4]];
            end else
                arr{p} <= mem[ad{p}[13:4]];
            if (RST{p}) arr{p} <= 18'h0;
        end
        if (OCE{p}) out{p} <= RST{p} ? 18'h0 : arr{p};
    end
    wire [17:0] do{p} = REGMODE_{p} == "OUTREG" ? out{p} : arr{p};
    assign {_bits("DO" + p, 18)} = do{p};
"""


DP16KD_MODEL = f"""\
// Behavioural DP16KD (ECP5 block RAM), x18 mode only: see sim/ecp5_cells.py.
module DP16KD(
  input DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5, DIA4, DIA3, DIA2, DIA1, DIA0,
  input ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0,
  input CEA, OCEA, CLKA, WEA, RSTA,
  input CSA2, CSA1, CSA0,
  output DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5, DOA4, DOA3, DOA2, DOA1, DOA0,
  input DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7, DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0,
  input ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0,
  input CEB, OCEB, CLKB, WEB, RSTB,
  input CSB2, CSB1, CSB0,
  output DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5, DOB4, DOB3, DOB2, DOB1, DOB0
);
    parameter DATA_WIDTH_A = 18;
    parameter DATA_WIDTH_B = 18;
    parameter REGMODE_A = "NOREG";
    parameter REGMODE_B = "NOREG";
    parameter RESETMODE = "SYNC";
    parameter ASYNC_RESET_RELEASE = "SYNC";
    parameter CSDECODE_A = "0b000";
    parameter CSDECODE_B = "0b000";
    parameter WRITEMODE_A = "NORMAL";
    parameter WRITEMODE_B = "NORMAL";
    parameter CLKAMUX = "CLKA";
    parameter CLKBMUX = "CLKB";
    parameter GSR = "ENABLED";
{_initvals()}
    reg [17:0] mem [0:1023];

    task load(input integer j, input [319:0] v);
        integer i;
        for (i = 0; i < 16; i = i + 1) mem[16 * j + i] = v[20 * i +: 18];
    endtask

    initial begin
        if (DATA_WIDTH_A != 18 || DATA_WIDTH_B != 18 || (RESETMODE != "SYNC" && RESETMODE != "ASYNC") || CSDECODE_A != "0b000"
                || CSDECODE_B != "0b000" || CLKAMUX != "CLKA" || CLKBMUX != "CLKB"
                || (REGMODE_A != "NOREG" && REGMODE_A != "OUTREG") || (REGMODE_B != "NOREG" && REGMODE_B != "OUTREG")) begin
            $fatal(1, "DP16KD model: configuration not modelled (x18, CSDECODE 0b000, CLKxMUX CLKx only)");
        end
{_init_loop()}    end

    always @(posedge CLKA) if (RESETMODE == "ASYNC" && (RSTA || RSTB)) begin
        $fatal(1, "DP16KD model: asynchronous reset not modelled");
    end
    always @(posedge CLKA) if ({{CSA2, CSA1, CSA0}} != 3'b000) begin
        $fatal(1, "DP16KD model: CSA not modelled");
    end
    always @(posedge CLKB) if ({{CSB2, CSB1, CSB0}} != 3'b000) begin
        $fatal(1, "DP16KD model: CSB not modelled");
    end
{_port("A")}{_port("B")}
endmodule
"""


def write_dp16kd_model(path) -> Path:
    path = Path(path)
    path.write_text(DP16KD_MODEL)
    return path
