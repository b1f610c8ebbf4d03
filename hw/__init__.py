"""The gateware. The vector datapath (``bitlinear_front``, ``scalar_unit``, ``output_scale``,
``elementwise``, ``embed_scale``, ``argmax``) does every per-token computation of the integer model
except ``acc = T @ q`` (``matvec``); ``engine`` runs a whole token step with them.

Bit-exact counterparts of ``reference/integer.py`` (one core per group of functions):

==================  ====================================================  =====  ======  ====
core                reference                                             DSPs   lat.    rate
==================  ====================================================  =====  ======  ====
BitLinearFront      normalise, z = v16 c, m, p, sum of squares, quantise    3      7     1/cyc
ScalarUnit          isqrt, scale_mantissa, t - k_exp                        0    <= 66   seq.
OutputScale         saturate(rshift_round(acc Qt, t - k_exp))               2      8     1/cyc
ElementwiseUnit     sigmoid, silu, mlgru's f, c and h, p / glu's v, x + o   7     14     1/cyc
EmbedScale          embed                                                   2      6     1/cyc
Argmax              IntegerModel.argmax (first index of the maximum)        0      1     1/cyc
==================  ====================================================  =====  ======  ====

DSPs: multipliers of 16x16 or smaller, one iCE40 SB_MAC16 or ECP5 MULT18X18D each; lat.: cycles
from an accepted input to its output; rate: elements per cycle sustained. Every pipeline stage
holds at most one carry chain of about 35 bits, so each core meets the boards' clock targets
(BENCHMARKS.md has the measured Fmax of the builds).

Why several fixed cores and one programmable one: the BitLinear front end, the scalar unit and
the output scaling are needed for every matrix, with different data at the same time (the
front end of the next BitLinear can run while the matrix unit and the output scaling finish
the current one), so they are separate streaming cores. The nonlinear steps (sigmoid, SiLU, the
MLGRU gate, state and output, the GLU product, the residual add) each consume the output of a
different matrix, never two at once, so they are ops of one pipeline that shares the sigmoid
table and its multipliers among them. Every stream follows ``amaranth.lib.stream`` and carries
``last`` on a vector's final element where a consumer needs the vector's end.

How an engine drives them for one BitLinear (input v of n elements in a memory, its a, c, trits
and K = k_mant 2^k_exp):

1. ``BitLinearFront.i``: v with op MAX (skip it when the same v was just MAX-passed: i_proj,
   f_proj and g_proj share x), then (v, a, c) with op STATS, then (v, c) with op QUANT; ``last``
   on each pass's final element. v is read three times; nothing else is stored.
2. ``front.stats`` connects to ``ScalarUnit.i``; ``k_mant``/``k_exp`` must be on the scalar unit's
   ports when it accepts the stats. Its result ``o`` (qt, shift) is held by the engine on
   ``OutputScale.scale`` while that BitLinear's accumulators go in.
3. ``front.q`` (one int8 per cycle) goes to the matrix unit's activation buffer (a gearbox packs
   ``lanes`` of them per beat for ``TernaryMatVec.act``).
4. ``TernaryMatVec.out`` connects to ``OutputScale.i``; ``OutputScale.o`` (Q16 y, ``last``) goes to
   the ``ElementwiseUnit`` (joined with operands read from memory), a memory, or ``Argmax``.

One layer (x, the layer's h and lower bound lb in memories; order f before i because the state
update needs f):

==========  =======================================  ==========================================
matrix      front passes (input)                     output path
==========  =======================================  ==========================================
f_proj      MAX (x), STATS, QUANT                    FORGET(y, g = lb) -> f (Q15, 16 bits)
i_proj      STATS, QUANT (x)                         RECUR(y, g = f, a = h) -> h (in place)
g_proj      STATS, QUANT (x)                         SILU_MUL(a = y, y = h) -> p
o_proj      MAX, STATS, QUANT (p)                    ADD(y, a = x) -> x (in place)
gate_proj   MAX, STATS, QUANT (x)                    rows < I: y -> gate; rows >= I:
                                                     SILU_MUL(a = y, y = gate) -> gate (in place)
down_proj   MAX, STATS, QUANT (gate, I elements)     ADD(y, a = x) -> x (in place)
==========  =======================================  ==========================================

A token starts with ``EmbedScale`` (the embedding row and its scale -> x) and ends with lm_head
(MAX, STATS, QUANT over x) whose ``OutputScale.o`` goes to ``Argmax``. Vectors to keep: x (d),
h for every layer (L d), f (d, 16 bits), p and gate (one buffer of max(d, I)).
"""
