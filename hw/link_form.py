"""The Link's two forms as strategy objects: which parts it is built from, and the few places
where its parser and state machine differ.

:class:`DefaultForm` is tuned for ECP5 timing; :class:`SmallForm` takes fewer logic cells on the
iCE40 for a slower parser (the Link's module docstring, "Small form"). Both give the same
bytes on the wire. :class:`~.link.Link` asks its form for

* its parts: ``IdleTimer``, ``BootId`` (a counted boot id), ``Crcs``, ``Check``, ``Payload`` and
  ``Chunk`` (component classes), and ``state_crcs`` (the image CRC registers);
* the parser's timing: ``done`` / ``after_feeder`` (waiting for the CRCs), ``parse_position``
  (how the parse position moves), ``ready_byte``, ``header_compare``;
* the request's first word, compared as it arrives (``on_op_byte``, ``on_payload_byte``,
  ``stored_arg_bytes``);
* the decision and the response: ``after_check`` (the state after CHECK), ``decide`` (the
  DECIDE state, and VERDICT before it), ``restart_response``, ``image_crc_cleared`` /
  ``image_crc_committed``, ``send_end``, ``fsm_attrs``;
* the wiring of the form-specific members of its parts: ``connect_check``, ``connect_payload``,
  ``connect_chunk``.

Every hook that takes ``b`` reads the Link's shared signals from that namespace (the names the
Link's methods give them).
"""

from __future__ import annotations

import contextlib

from amaranth.hdl import Const, Mux, Signal

from mmfree_fpga.protocol import Op

from .link_check import OP_INDEX, RequestCheck, SmallRequestCheck
from .link_chunk import BoundedChunk, CountedChunk
from .link_crc import ByteCrcs, SerialCrcs
from .link_respond import MuxPayload, PayloadKind, RomPayload
from .link_timers import CountingBootId, CountingIdleTimer, FixedBootId, LfsrBootId, LfsrIdleTimer

__all__ = ["LinkForm", "DefaultForm", "SmallForm"]


class LinkForm:
    """What a form of the Link provides (module docstring); :class:`DefaultForm` and
    :class:`SmallForm` are the two."""

    small = False
    IdleTimer = BootId = Crcs = Check = Payload = Chunk = None
    stored_arg_bytes = 0          # request payload bytes from this index on are stored in ``args``
    after_check = "DECIDE"        # the state after CHECK

    def boot_id(self, value):
        """The boot id part: a fixed one for ``value``, else counted."""
        return FixedBootId(value) if value is not None else self.BootId()


class DefaultForm(LinkForm):
    """The form tuned for ECP5 timing: byte-wide CRCs, counters, a multiplexer over the payloads."""

    IdleTimer, BootId, Crcs = CountingIdleTimer, CountingBootId, ByteCrcs
    Check, Payload, Chunk = RequestCheck, MuxPayload, CountedChunk

    def state_crcs(self, init, preloaded):
        """(image_crc, load_crc): the loaded image's CRC is a register of its own."""
        return Signal(32, init=init, reset_less=preloaded), Signal(32)

    # -- the parser --------------------------------------------------------------------------
    def done(self, b, cond):
        return cond

    def after_feeder(self, m, b):
        return contextlib.nullcontext()

    def parse_position(self, m, b):
        """Drive ``rp_next``; return whether the parse position moves at this clock edge."""
        m.d.comb += b.rp_next.eq(Mux(b.jump, b.sp + 1, Mux(b.take, b.rp + 1, b.rp)))
        return b.take | b.jump

    def ready_byte(self, m, b, moved):
        return b.got

    def header_compare(self, m, b):
        m.d.comb += b.hcrc_differs.eq(b.byte != b.crcs.header_crc)

    def on_op_byte(self, m, b):
        pass

    def on_payload_byte(self, m, b):
        pass

    # -- the decision and the response -----------------------------------------------------------
    def restart_response(self, m, b):
        """A response is decided: its counters start again (here, where it is decided)."""
        m.d.comb += b.sender.restart.eq(1)

    def image_crc_cleared(self, b):
        return [b.image_crc.eq(0)]

    def image_crc_committed(self, b):
        return [b.image_crc.eq(b.load_crc)]

    def decide(self, m, b, checks, commands):
        """DECIDE: the first of ``checks`` (condition, branch) that holds, else the branch of the
        opcode among ``commands`` (command, branch)."""
        with m.State("DECIDE"):
            for n, (cond, body) in enumerate(checks):
                with (m.If if n == 0 else m.Elif)(cond):
                    body()
            with m.Else():
                with m.Switch(b.op_code):
                    for command, body in commands:
                        with m.Case(OP_INDEX[command]):
                            body()

    def send_end(self, m, b):
        """SEND_END: done once the last byte has been taken."""
        with m.State("SEND_END"):
            with m.If(b.nb_free):
                b.finish_response()
                m.next = "HUNT"

    def fsm_attrs(self, fsm):
        pass

    # -- the parts' own members ----------------------------------------------------------------
    def connect_check(self, m, b, check):
        b.nak_arg = check.nak_arg
        return {}

    def connect_payload(self, m, b, payload):
        m.d.comb += [payload.image_crc.eq(b.image_crc), payload.nak_arg.eq(b.nak_arg)]

    def connect_chunk(self, m, b, chunk):
        m.d.comb += chunk.length.eq(b.length)


class SmallForm(LinkForm):
    """The form for the iCE40 (the Link's module docstring, "Small form"): bit-serial CRCs,
    LFSRs, the response ROM, a registered parse position and decision."""

    small = True
    IdleTimer, BootId, Crcs = LfsrIdleTimer, LfsrBootId, SerialCrcs
    Check, Payload, Chunk = SmallRequestCheck, RomPayload, BoundedChunk
    stored_arg_bytes = 4          # (the first word is compared as it arrives, not stored)
    after_check = "VERDICT"

    def state_crcs(self, init, preloaded):
        """(image_crc, load_crc): the image CRC is load_crc while weights are loaded, else 0 (a
        commit copies load_crc, a LOAD_BEGIN clears the weights), so only load_crc is a register."""
        return Signal(32), Signal(32, init=init, reset_less=preloaded)

    # -- the parser --------------------------------------------------------------------------
    def done(self, b, cond):
        """``cond``, and the CRCs not busy in this cycle and the one before (so a comparison
        with a CRC registered in the cycle before sees its final value)."""
        return cond & ~b.feeding & b.crcs.settled

    def after_feeder(self, m, b):
        """A block that runs once the CRCs are not busy."""
        return m.If(~b.feeding)

    def parse_position(self, m, b):
        # the parse position moves in the cycle after the parser's decision, from registers
        # (take_r, jump_r), so the decision's logic does not reach rp, read_ok and got; the
        # parser takes no byte then, and the byte read before it is not the one at rp
        take_r, jump_r = Signal(), Signal()
        m.d.sync += [take_r.eq(b.take), jump_r.eq(b.jump)]
        m.d.comb += b.rp_next.eq(Mux(jump_r, b.sp, Mux(take_r, b.rp + 1, b.rp)))   # (sp has moved on by then)
        return take_r | jump_r

    def ready_byte(self, m, b, moved):
        # got, and the CRCs done with the previous byte: a register and nothing else (no path
        # runs through the CRCs' count and the parser's states into rp, and none from the
        # position's move registers into the parser's decisions). Not set in a cycle that moves
        # the parse position or follows one (a take needs ready_r, which clears it anyway; a jump
        # (rescan) may come without), nor in the cycle after it was set: the byte may have been
        # taken; a byte that was not is ready again two cycles later.
        ready_r = Signal()
        m.d.sync += ready_r.eq(b.got & ~b.feeding & ~moved & ~ready_r & ~b.jump)
        return ready_r

    def header_compare(self, m, b):
        # compared as the byte is registered (the CRC is final then: done() waits a cycle after
        # the CRCs), so the comparison is not on the path from the byte into the decisions
        m.d.sync += b.hcrc_differs.eq(b.ring_q != b.crcs.header_crc)

    def on_op_byte(self, m, b):
        """The response whose first word the request's first word is checked against."""
        m.d.comb += b.sender.restart_payload.eq(1)
        with m.Switch(b.byte):
            for command, kind in ((Op.LOAD_BEGIN, PayloadKind.LOAD_BEGIN), (Op.LOAD_CHUNK, PayloadKind.LOAD_CHUNK),
                                  (Op.FEED_TOKEN, PayloadKind.FEED_TOKEN), (Op.READ_LOGITS, PayloadKind.LOGITS)):
                with m.Case(command):
                    m.d.sync += b.out_kind.eq(kind)

    def on_payload_byte(self, m, b):
        """The first payload word, compared byte by byte with that response's first word."""
        m.d.comb += b.sender.advance.eq(b.arg_sel[:4] != 0)
        with m.If(b.arg_sel[0]):
            m.d.sync += [b.word0_differs.eq(b.byte != b.payload_byte), b.word0_ones.eq(b.byte == 0xFF)]
        with m.Elif(b.arg_sel[1:4] != 0):
            m.d.sync += [b.word0_differs.eq(b.word0_differs | (b.byte != b.payload_byte)),
                         b.word0_ones.eq(b.word0_ones & (b.byte == 0xFF))]

    # -- the decision and the response -----------------------------------------------------------
    def restart_response(self, m, b):
        pass            # (in DECIDE whatever is decided)

    def image_crc_cleared(self, b):
        return []       # (image_crc follows load_crc and weights_loaded)

    def image_crc_committed(self, b):
        return []

    def decide(self, m, b, checks, commands):
        # the decision, one-hot in registers set in VERDICT: each branch is one flip-flop in
        # DECIDE (its priority chain does not reach the registers' enables)
        verdict = [Signal(name=f"verdict_{body.__name__[3:]}") for _, body in checks + commands]
        with m.State("VERDICT"):
            earlier = Const(0)
            for flag, (cond, _) in zip(verdict, checks):
                m.d.sync += flag.eq(cond.any() & ~earlier)
                earlier = earlier | cond.any()
            for flag, (command, _) in zip(verdict[len(checks):], commands):
                m.d.sync += flag.eq(~earlier & (b.op_code == OP_INDEX[command]))
            m.next = "DECIDE"
        with m.State("DECIDE"):
            # a response's counters start at 0 whatever is decided (set in the decisions'
            # branches, j's enable would be a path through all of them)
            m.d.comb += b.sender.restart.eq(1)
            for flag, (_, body) in zip(verdict, checks + commands):
                with m.If(flag):
                    body()

    def send_end(self, m, b):
        # the parse position moves in the cycle after the last byte was taken (SEND_DONE), so
        # nb_free, the rescan and rp's enable are not one path
        with m.State("SEND_END"):
            with m.If(b.nb_free):
                m.next = "SEND_DONE"
        with m.State("SEND_DONE"):
            b.finish_response()
            m.next = "HUNT"

    def fsm_attrs(self, fsm):
        # one flip-flop per state (Yosys recodes the FSM): decoding the binary state was the
        # start of most of the Link's long paths on iCE40
        fsm.state.attrs["fsm_encoding"] = "one-hot"

    # -- the parts' own members ----------------------------------------------------------------
    def connect_check(self, m, b, check):
        m.d.comb += [check.word0_differs.eq(b.word0_differs), check.word0_ones.eq(b.word0_ones)]
        return {"load_left": check.load_left}

    def connect_payload(self, m, b, payload):
        m.d.comb += [b.image_crc.eq(Mux(b.weights_loaded, b.load_crc, 0)),
                     payload.nak_arg_sel.eq(b.nak_arg_sel), payload.load_left.eq(b.check.load_left)]

    def connect_chunk(self, m, b, chunk):
        m.d.comb += chunk.frame_end.eq(b.rp)
