"""Efficiency and overhead parameters of the cost model: one equinox module per device.

Every field is an unconstrained array (logits or logs) so that optax can fit it directly;
properties map them to the physical quantities (fractions of peak, seconds). Defaults are sane
for uncalibrated hardware; fitted values are JSON files under calibration/params/ that
`load_params(device_name)` picks up by default.
"""

from __future__ import annotations

import dataclasses
import json
from enum import IntEnum
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


class Op(IntEnum):
    """Operator classes that share efficiency parameters."""

    GEMM = 0  # dense linear layers, LM head
    ATTN_PREFILL = 1  # causal (or bidirectional) attention over a prompt chunk
    ATTN_DECODE = 2  # paged attention of one new token over its context
    MOE = 3  # grouped expert GEMMs
    ELEMENTWISE = 4  # norms, activations, rotary, residuals, embedding gather


class Comm(IntEnum):
    """Collective classes that share link-efficiency parameters."""

    ALLREDUCE = 0
    ALLGATHER = 1
    ALLTOALL = 2
    SEND_RECV = 3


NUM_OPS = len(Op)
NUM_COMMS = len(Comm)


def _logit(p):
    p = np.asarray(p, dtype=np.float32)
    return np.log(p) - np.log1p(-p)


def _logit64(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


class CostParams(eqx.Module):
    """Fitted (or default) efficiency terms of one device's cost model.

    Per operator class (index `Op`):
      compute_logit: peak compute efficiency, sigmoid(.) in (0, 1)
      memory_logit: memory-bandwidth efficiency, sigmoid(.) in (0, 1)
      log_m_half: log of the rows (tokens) at which a kernel reaches half its peak compute efficiency;
        for attention it is the kernel's tile instead: prefill pads each sequence's queries and
        keys per query to it, decode reads at least that many keys per sequence
      log_overhead: log seconds of fixed per-kernel time (launch, tail, synchronisation)
      log_sharpness: log of the exponent p of the smooth max of compute and memory time
      log_serial_bw: log bytes/s one thread block streams when it works alone through a long loop:
        decode attention, a kernel that runs one block per (sequence, KV head) without splitting
        the context (FlashAttention-2 on MHA models): a floor of (longest context) x (one head's KV
        bytes per token) / serial_bw; GEMM, the K loop of one output tile (roofline.gemm_serial_bytes)
      log_item_time: decode attention: log seconds of fixed work per (sequence, KV head, layer)
        work item as the whole device pipelines them (a thread block's latency over the blocks
        resident at once): the block-table walk, query load, softmax merge and output store that
        every item pays however short its context; charged as the keys one head streams in that
        time (see mist.cost.iteration.decode_tile_keys). Prefill attention: log seconds per thread
        block (query tile) and layer, the same fixed work of a block however few keys it visits
        (mist.cost.iteration.prefill_block_time). Both beyond the first wave (log_item_wave)
      log_split_time: attention: log seconds of the second kernel that a GQA decode call
        launches per layer when it splits the context or regroups its heads (FlashAttention-2: the
        split-KV combine kernel, the copies of the head-regrouped query and output; see
        mist.cost.iteration.decode_extra_launches); fitted per device, ~0 where the kernels do not
        launch that way. GEMM: the time tau per split of reducing a split-K GEMM's partial tiles,
        which turns the K-loop floor t into t / sqrt(1 + t / 4 tau) (mist.cost.roofline.gemm_serial_time;
        ~0: no split, the floor t)
      log_group_time: attention: log seconds per layer that a GQA call's head-regrouped single-token
        path takes beyond an MHA call's fixed time (FlashAttention-2 runs a KV group's query heads as
        the rows of one query tile, from reshaped query, output and softmax statistics); fitted per
        device, ~0 where the kernels pack heads natively
      gqa_pack_logit: prefill attention only: sigmoid(.) in (0, 1) is the exponent e of the GQA
        packing of query tiles for chunks of more than one token: a query tile holds q_per_kv^e
        query heads of one KV head (1: all of them, FlashAttention-3; ~0: one, FlashAttention-2,
        which packs the group only for single-token queries; see
        mist.cost.iteration.prefill_tile_pairs)
      log_block_half: prefill attention only: log of the thread blocks b at which the kernel reaches
        half its compute efficiency: a call of B blocks (query tiles x query heads x sequences, see
        mist.cost.iteration.prefill_blocks) runs its compute at B / (B + b) of the fitted efficiency,
        i.e. costs (1 + b / B) times as long (too few blocks leave SMs idle, the last wave runs
        partly empty, few blocks per SM hide less latency); fitted per device, ~0 (off) where the
        kernels fill the machine otherwise
      log_width_time: decode attention only: log seconds per layer, per element of head width
        (d_qk + d_v), of a call's fixed time beyond params.overhead: the pipeline fill of a thread
        block (query load, the first KV tile's load and its QK^T and PV steps, the output store)
        runs before anything overlaps and grows with the head width (FlashAttention-3 on H100: a
        call of one short sequence takes ~10.3 us at head dim 64, ~11.5 at 128, ~12.3 at 256)
      log_seq_time, log_seq_half: decode attention only: the kernel that serves head dims above
        WIDE_HEAD_DIM (vLLM's FlashAttention-4 path on Hopper, beyond FlashAttention-3's 256 limit)
        pays a time per sequence and layer that does not overlap across sequences:
        seq_time x n x (1 + n / seq_half) for a call of n sequences (see
        mist.cost.iteration.decode_wide_time); fitted per device, off where no such rows exist
      log_item_wave: attention: log of the work items (decode: (sequence, KV head); prefill: thread
        blocks) that run concurrently in a call's first wave and whose fixed work hides under the call's fixed time:
        a call of x items per layer pays item_time for x - w (1 - exp(-x / w)) of them (~x^2 / 2w
        below a wave, x - w above; see mist.cost.roofline.waved_items); ~0 (off) in files written
        before it
      log_narrow_tile: prefill attention only: log of the ratio of the query tile (m_half) and of the
        thread block's query rows (PREFILL_BLOCK_M) at head dims <= NARROW_HEAD_DIM (64) to those at
        wider heads: FlashAttention-3 on Hopper runs 192-row query tiles at head dim 64 and 128-row
        tiles at 128-256 (1.5); FlashAttention-2 128 rows at both (1); fitted per device, 1 (off)
        in files written before it (see mist.cost.iteration.prefill_tile_pairs)
      log_pair_width: prefill attention only: log of the work per query-key pair and head that does not
        scale with the head width (softmax, masking, rescaling), in head-width units: a pair costs
        2 (d_qk + d_v + pair_width) FLOPs at the kernel's efficiency instead of 2 (d_qk + d_v)
    Per collective class (index `Comm`):
      comm_bw_logit: achieved fraction of the link bandwidth (for large messages)
      log_comm_latency_scale: multiplier on the link's per-step latency
      log_comm_s_half: log bytes of the message size scale s of the bandwidth ramp: the library
        reaches bw_eff * S / (S + s^beta S^(1-beta)) of the link for an S-byte message (protocol
        and channel switches make the achieved bandwidth grow with the message)
      comm_beta_logit: beta in (0, 1) of that ramp, sigmoid(.)
      log_comm_group_exp: log of the exponent gamma on the ring factor ((g-1)/g)^gamma (NCCL's bus
        bandwidth grows with the group on a switched domain: more channels, NVLS)
      log_comm_overhead: log seconds of fixed time per collective call (launch, synchronisation)
    Per engine iteration (CPU side, fitted end to end):
      log_cpu_iter: seconds of fixed scheduler/launch work per iteration
      log_cpu_per_seq: seconds per scheduled sequence (input preparation, sampling)
      log_cpu_per_token: seconds per batched token (input preparation)
      log_cpu_per_prompt: seconds per prompt chunk an iteration prefills (prompt-side input
        preparation and per-prompt work of the serving stack; off, CPU_PROMPT_OFF, unless fitted)
      log_cpu_per_token_above: seconds per token of an iteration beyond cpu_token_knee tokens (a
        serving stack whose time per token rises past some iteration size; off, CPU_ABOVE_OFF,
        unless fitted)
      cpu_token_knee: tokens per iteration from which log_cpu_per_token_above is charged (fixed,
        not fitted; CPU_KNEE_DEFAULT)
    Stochastic: step_noise_sigma: sigma of a lognormal multiplier on step times (0 = off).
    """

    compute_logit: Float[Array, "ops"]
    memory_logit: Float[Array, "ops"]
    log_m_half: Float[Array, "ops"]
    log_overhead: Float[Array, "ops"]
    log_sharpness: Float[Array, "ops"]
    log_pair_width: Float[Array, "ops"]
    log_serial_bw: Float[Array, "ops"]
    log_item_time: Float[Array, "ops"]
    log_split_time: Float[Array, "ops"]
    log_group_time: Float[Array, "ops"]
    gqa_pack_logit: Float[Array, "ops"]
    log_block_half: Float[Array, "ops"]
    log_width_time: Float[Array, "ops"]
    log_seq_time: Float[Array, "ops"]
    log_seq_half: Float[Array, "ops"]
    log_item_wave: Float[Array, "ops"]
    log_narrow_tile: Float[Array, "ops"]
    comm_bw_logit: Float[Array, "comms"]
    log_comm_latency_scale: Float[Array, "comms"]
    log_comm_s_half: Float[Array, "comms"]
    comm_beta_logit: Float[Array, "comms"]
    log_comm_group_exp: Float[Array, "comms"]
    log_comm_overhead: Float[Array, "comms"]
    log_cpu_iter: Float[Array, ""]
    log_cpu_per_seq: Float[Array, ""]
    log_cpu_per_token: Float[Array, ""]
    log_cpu_per_prompt: Float[Array, ""]
    log_cpu_per_token_above: Float[Array, ""]
    cpu_token_knee: Float[Array, ""]
    step_noise_sigma: Float[Array, ""]

    # --- physical views
    @property
    def compute_eff(self):
        return jax_sigmoid(self.compute_logit)

    @property
    def memory_eff(self):
        return jax_sigmoid(self.memory_logit)

    @property
    def m_half(self):
        return jnp.exp(self.log_m_half)

    @property
    def overhead(self):
        return jnp.exp(self.log_overhead)

    @property
    def sharpness(self):
        return jnp.exp(self.log_sharpness)

    @property
    def pair_width(self):
        return jnp.exp(self.log_pair_width)

    @property
    def serial_bw(self):
        return jnp.exp(self.log_serial_bw)

    @property
    def item_time(self):
        return jnp.exp(self.log_item_time)

    @property
    def split_time(self):
        return jnp.exp(self.log_split_time)

    @property
    def group_time(self):
        return jnp.exp(self.log_group_time)

    @property
    def gqa_pack(self):
        return jax_sigmoid(self.gqa_pack_logit)

    @property
    def block_half(self):
        return jnp.exp(self.log_block_half)

    @property
    def width_time(self):
        return jnp.exp(self.log_width_time)

    @property
    def seq_time(self):
        return jnp.exp(self.log_seq_time)

    @property
    def seq_half(self):
        return jnp.exp(self.log_seq_half)

    @property
    def item_wave(self):
        return jnp.exp(self.log_item_wave)

    @property
    def narrow_tile(self):
        return jnp.exp(self.log_narrow_tile)

    @property
    def comm_bw_eff(self):
        return jax_sigmoid(self.comm_bw_logit)

    @property
    def comm_latency_scale(self):
        return jnp.exp(self.log_comm_latency_scale)

    @property
    def comm_s_half(self):
        return jnp.exp(self.log_comm_s_half)

    @property
    def comm_beta(self):
        return jax_sigmoid(self.comm_beta_logit)

    @property
    def comm_group_exp(self):
        return jnp.exp(self.log_comm_group_exp)

    @property
    def comm_overhead(self):
        return jnp.exp(self.log_comm_overhead)

    @property
    def cpu_iter(self):
        return jnp.exp(self.log_cpu_iter)

    @property
    def cpu_per_seq(self):
        return jnp.exp(self.log_cpu_per_seq)

    @property
    def cpu_per_token(self):
        return jnp.exp(self.log_cpu_per_token)

    @property
    def cpu_per_prompt(self):
        return jnp.exp(self.log_cpu_per_prompt)

    @property
    def cpu_per_token_above(self):
        return jnp.exp(self.log_cpu_per_token_above)

    # --- serialisation
    def to_dict(self) -> dict:
        """Physical values (what a person reads in the JSON file)."""
        f = lambda x: np.asarray(x, dtype=np.float64).tolist()  # noqa: E731
        return {
            "ops": {op.name.lower(): {
                "compute_eff": f(self.compute_eff[op]),
                "memory_eff": f(self.memory_eff[op]),
                "m_half_tokens": f(self.m_half[op]),
                "overhead_us": f(self.overhead[op] * 1e6),
                "sharpness": f(self.sharpness[op]),
                "pair_width": f(self.pair_width[op]),
                "serial_bw_gbs": f(self.serial_bw[op] * 1e-9),
                "item_time_ns": f(self.item_time[op] * 1e9),
                "split_time_us": f(self.split_time[op] * 1e6),
                "group_time_us": f(self.group_time[op] * 1e6),
                "gqa_pack": f(self.gqa_pack[op]),
                "block_half": f(self.block_half[op]),
                "width_time_ns": f(self.width_time[op] * 1e9),
                "seq_time_us": f(self.seq_time[op] * 1e6),
                "seq_half": f(self.seq_half[op]),
                "item_wave": f(self.item_wave[op]),
                "narrow_tile": f(self.narrow_tile[op]),
            } for op in Op},
            "comms": {c.name.lower(): {
                "bw_eff": f(self.comm_bw_eff[c]),
                "latency_scale": f(self.comm_latency_scale[c]),
                "s_half_bytes": f(self.comm_s_half[c]),
                "beta": f(self.comm_beta[c]),
                "group_exp": f(self.comm_group_exp[c]),
                "overhead_us": f(self.comm_overhead[c] * 1e6),
            } for c in Comm},
            "cpu": {
                "iter_us": f(self.cpu_iter * 1e6),
                "per_seq_us": f(self.cpu_per_seq * 1e6),
                "per_token_us": f(self.cpu_per_token * 1e6),
                "per_prompt_us": f(self.cpu_per_prompt * 1e6),
                "per_token_above_us": f(self.cpu_per_token_above * 1e6),
                "token_knee": f(self.cpu_token_knee),
            },
            "step_noise_sigma": f(self.step_noise_sigma),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "<params>") -> "CostParams":
        from ..specs.errors import SpecError

        try:
            ops, comms, cpu = d["ops"], d["comms"], d["cpu"]
            _check_cpu_terms(cpu, where, "cpu")
            # fields added after a file was written take the value that switches their term off
            # (the formula the file was fitted with)
            cget = lambda k, off: [comms[c.name.lower()].get(k, off) for c in Comm]  # noqa: E731
            return make_params(
                compute_eff=[ops[o.name.lower()]["compute_eff"] for o in Op],
                memory_eff=[ops[o.name.lower()]["memory_eff"] for o in Op],
                m_half=[ops[o.name.lower()]["m_half_tokens"] for o in Op],
                overhead_s=[ops[o.name.lower()]["overhead_us"] * 1e-6 for o in Op],
                sharpness=[ops[o.name.lower()]["sharpness"] for o in Op],
                pair_width=[ops[o.name.lower()].get("pair_width", PAIR_WIDTH_OFF) for o in Op],
                serial_bw=[ops[o.name.lower()].get("serial_bw_gbs", SERIAL_BW_OFF * 1e-9) * 1e9 for o in Op],
                item_time=[ops[o.name.lower()].get("item_time_ns", ITEM_TIME_OFF * 1e9) * 1e-9 for o in Op],
                split_time=[ops[o.name.lower()].get("split_time_us", SPLIT_TIME_OFF * 1e6) * 1e-6 for o in Op],
                group_time=[ops[o.name.lower()].get("group_time_us", SPLIT_TIME_OFF * 1e6) * 1e-6 for o in Op],
                gqa_pack=[ops[o.name.lower()].get("gqa_pack", GQA_PACK_FULL) for o in Op],
                block_half=[ops[o.name.lower()].get("block_half", BLOCK_HALF_OFF) for o in Op],
                width_time=[ops[o.name.lower()].get("width_time_ns", TIME_OFF * 1e9) * 1e-9 for o in Op],
                seq_time=[ops[o.name.lower()].get("seq_time_us", TIME_OFF * 1e6) * 1e-6 for o in Op],
                seq_half=[ops[o.name.lower()].get("seq_half", SEQ_HALF_OFF) for o in Op],
                item_wave=[ops[o.name.lower()].get("item_wave", ITEM_WAVE_OFF) for o in Op],
                narrow_tile=[ops[o.name.lower()].get("narrow_tile", NARROW_TILE_OFF) for o in Op],
                comm_bw_eff=[comms[c.name.lower()]["bw_eff"] for c in Comm],
                comm_latency_scale=[comms[c.name.lower()]["latency_scale"] for c in Comm],
                comm_s_half=cget("s_half_bytes", COMM_OFF["s_half"]),
                comm_beta=cget("beta", COMM_OFF["beta"]),
                comm_group_exp=cget("group_exp", COMM_OFF["group_exp"]),
                comm_overhead_s=[v * 1e-6 for v in cget("overhead_us", COMM_OFF["overhead_s"] * 1e6)],
                cpu_iter_s=cpu["iter_us"] * 1e-6,
                cpu_per_seq_s=cpu["per_seq_us"] * 1e-6,
                cpu_per_token_s=cpu["per_token_us"] * 1e-6,
                cpu_per_prompt_s=cpu.get("per_prompt_us", CPU_PROMPT_OFF * 1e6) * 1e-6,
                cpu_per_token_above_s=cpu.get("per_token_above_us", CPU_ABOVE_OFF * 1e6) * 1e-6,
                cpu_token_knee=cpu.get("token_knee", CPU_KNEE_DEFAULT),
                step_noise_sigma=d.get("step_noise_sigma", 0.0),
            )
        except (KeyError, TypeError) as e:
            raise SpecError(where, str(e), "missing or malformed cost parameter",
                            "regenerate the file with `mist calibrate`") from None


def _check_cpu_terms(cpu: dict, where: str, field: str):
    """The optional host-time terms of a "cpu" block (or of one of its serving-stack variants) are
    numbers >= 0: a wrong one would otherwise be clipped to "off" silently or fail deep inside JAX."""
    from ..specs.errors import SpecError

    for k in ("per_prompt_us", "per_token_above_us", "token_knee"):
        if k in cpu:
            v = cpu[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise SpecError(where, f"{field}.{k}", f"{v!r} is not a number >= 0",
                                "give a time in microseconds (token_knee: tokens per iteration) or leave "
                                "the key out to switch the term off")


def jax_sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


#: values of the collective terms that switch them off (a constant-bandwidth collective with no
#: fixed cost per call): what a parameter file written before those terms existed means
COMM_OFF = {"s_half": 1e-12, "beta": 0.5, "group_exp": 1.0, "overhead_s": 1e-12}
#: pair width that switches the per-pair attention work off (files written before it existed)
PAIR_WIDTH_OFF = 1e-6
#: serial (unsplit) decode bandwidth that switches its floor off (B/s)
SERIAL_BW_OFF = 1e18
#: fixed time per work item (s) that switches that term off (files written before it existed)
ITEM_TIME_OFF = 1e-30
#: time of a decode call's second kernel, and of the GQA regrouped path (s), that switches those
#: terms off (files written before them)
SPLIT_TIME_OFF = 1e-30
#: GQA packing exponent of full packing (files written before it existed; the clip of make_params
#: keeps it at 1 - 1e-4)
GQA_PACK_FULL = 1.0
#: half-efficiency thread blocks of prefill attention that switch the block ramp off (files
#: written before it existed)
BLOCK_HALF_OFF = 1e-30
#: a fixed time (s) that switches its term off (decode width and wide-head sequence times; files
#: written before them)
TIME_OFF = 1e-30
#: sequences at which the wide-head per-sequence time doubles, switching the growth off
SEQ_HALF_OFF = 1e30
#: decode items per first wave that switch the wave discount off (every item pays its time)
ITEM_WAVE_OFF = 1e-30
#: ratio of the prefill query tile at narrow heads to wider heads that switches that term off
NARROW_TILE_OFF = 1.0
#: host time per prefilled prompt chunk (s) that switches that term off (the default, and files
#: written before it existed)
CPU_PROMPT_OFF = 1e-12
#: host time per token beyond the knee (s) that switches that term off (exactly, in float64 sums of
#: durations of ~1e-6 s and more), and the default knee (tokens per iteration)
CPU_ABOVE_OFF = 1e-30
CPU_KNEE_DEFAULT = 2048.0


def make_params(compute_eff, memory_eff, m_half, overhead_s, sharpness, comm_bw_eff,
                comm_latency_scale, cpu_iter_s, cpu_per_seq_s, cpu_per_token_s,
                step_noise_sigma=0.0, comm_s_half=None, comm_beta=None, comm_group_exp=None,
                comm_overhead_s=None, pair_width=None, serial_bw=None, item_time=None,
                split_time=None, gqa_pack=None, group_time=None, block_half=None, width_time=None,
                seq_time=None, seq_half=None, item_wave=None, narrow_tile=None,
                cpu_per_prompt_s=CPU_PROMPT_OFF, cpu_per_token_above_s=CPU_ABOVE_OFF,
                cpu_token_knee=CPU_KNEE_DEFAULT) -> CostParams:
    """Build CostParams from physical values (collective terms and the attention pair width left
    out are switched off, see COMM_OFF, PAIR_WIDTH_OFF, SERIAL_BW_OFF, ITEM_TIME_OFF and
    SPLIT_TIME_OFF; the GQA packing is full, GQA_PACK_FULL; the block ramp off, BLOCK_HALF_OFF; the
    per-prompt host time off, CPU_PROMPT_OFF; the time per token beyond the knee off, CPU_ABOVE_OFF)."""
    full = lambda v, k: [COMM_OFF[k]] * NUM_COMMS if v is None else v  # noqa: E731
    a = lambda x: jnp.asarray(np.asarray(x, dtype=np.float32))  # noqa: E731
    clip = lambda p: np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)  # noqa: E731
    pos = lambda x: np.maximum(np.asarray(x, dtype=np.float64), 1e-12)  # noqa: E731
    return CostParams(
        compute_logit=a(_logit(clip(compute_eff))),
        memory_logit=a(_logit(clip(memory_eff))),
        log_m_half=a(np.log(pos(m_half))),
        log_overhead=a(np.log(pos(overhead_s))),
        log_sharpness=a(np.log(pos(sharpness))),
        log_pair_width=a(np.log(pos([PAIR_WIDTH_OFF] * NUM_OPS if pair_width is None else pair_width))),
        log_serial_bw=a(np.log(pos([SERIAL_BW_OFF] * NUM_OPS if serial_bw is None else serial_bw))),
        log_item_time=a(np.log(np.maximum(np.asarray([ITEM_TIME_OFF] * NUM_OPS if item_time is None
                                                     else item_time, dtype=np.float64), 1e-30))),
        log_split_time=a(np.log(np.maximum(np.asarray([SPLIT_TIME_OFF] * NUM_OPS if split_time is None
                                                      else split_time, dtype=np.float64), 1e-30))),
        log_group_time=a(np.log(np.maximum(np.asarray([SPLIT_TIME_OFF] * NUM_OPS if group_time is None
                                                      else group_time, dtype=np.float64), 1e-30))),
        # clipped nearer to 1 than the efficiencies: full packing evaluates to exactly 1 in float32
        gqa_pack_logit=a(_logit64(np.clip(np.asarray([GQA_PACK_FULL] * NUM_OPS if gqa_pack is None else gqa_pack,
                                                     dtype=np.float64), 1e-6, 1 - 1e-9))),
        log_block_half=a(np.log(np.maximum(np.asarray([BLOCK_HALF_OFF] * NUM_OPS if block_half is None
                                                      else block_half, dtype=np.float64), 1e-30))),
        log_width_time=a(np.log(np.maximum(np.asarray([TIME_OFF] * NUM_OPS if width_time is None
                                                      else width_time, dtype=np.float64), 1e-30))),
        log_seq_time=a(np.log(np.maximum(np.asarray([TIME_OFF] * NUM_OPS if seq_time is None
                                                    else seq_time, dtype=np.float64), 1e-30))),
        log_seq_half=a(np.log(np.minimum(np.asarray([SEQ_HALF_OFF] * NUM_OPS if seq_half is None
                                                    else seq_half, dtype=np.float64), 1e30))),
        log_item_wave=a(np.log(np.maximum(np.asarray([ITEM_WAVE_OFF] * NUM_OPS if item_wave is None
                                                     else item_wave, dtype=np.float64), 1e-30))),
        log_narrow_tile=a(np.log(pos([NARROW_TILE_OFF] * NUM_OPS if narrow_tile is None else narrow_tile))),
        comm_bw_logit=a(_logit(clip(comm_bw_eff))),
        log_comm_latency_scale=a(np.log(pos(comm_latency_scale))),
        log_comm_s_half=a(np.log(pos(full(comm_s_half, "s_half")))),
        comm_beta_logit=a(_logit(clip(full(comm_beta, "beta")))),
        log_comm_group_exp=a(np.log(pos(full(comm_group_exp, "group_exp")))),
        log_comm_overhead=a(np.log(pos(full(comm_overhead_s, "overhead_s")))),
        log_cpu_iter=a(np.log(pos(cpu_iter_s))),
        log_cpu_per_seq=a(np.log(pos(cpu_per_seq_s))),
        log_cpu_per_token=a(np.log(pos(cpu_per_token_s))),
        log_cpu_per_prompt=a(np.log(pos(cpu_per_prompt_s))),
        log_cpu_per_token_above=a(np.log(np.maximum(np.asarray(cpu_per_token_above_s, dtype=np.float64), 1e-30))),
        cpu_token_knee=a(cpu_token_knee),
        step_noise_sigma=a(step_noise_sigma),
    )


def default_params(kind: str = "gpu") -> CostParams:
    """Uncalibrated defaults: typical fractions of peak reached by tuned serving kernels.

    GPUs and accelerators: dense GEMMs ~75% of peak compute, attention ~55% (prefill) and ~70%
    of memory bandwidth (decode), elementwise kernels ~70% of bandwidth, a few microseconds of
    fixed time per kernel. Collectives: NCCL-like, ~90% of the link for large messages with the
    bandwidth ramp, ring-factor exponent and per-call time typical of the NCCL fits on NVLink
    (A100, H100, H200: s_half 2-10 MB, beta ~0.45, gamma ~0.6, 1.5-6 us). CPUs reach a lower
    fraction of their (AMX/AVX-512) peak and pay more per kernel.
    """
    if kind == "cpu":
        return make_params(
            compute_eff=[0.45, 0.30, 0.30, 0.35, 0.30],
            memory_eff=[0.60, 0.55, 0.60, 0.55, 0.50],
            m_half=[16.0, 64.0, 16.0, 8.0, 1.0],
            overhead_s=[2e-5, 3e-5, 2e-5, 3e-5, 1e-5],
            sharpness=[3.0] * NUM_OPS,
            comm_bw_eff=[0.6] * NUM_COMMS,
            comm_latency_scale=[1.0] * NUM_COMMS,
            cpu_iter_s=1e-3, cpu_per_seq_s=2e-5, cpu_per_token_s=1e-7,
        )
    return make_params(
        compute_eff=[0.75, 0.55, 0.40, 0.60, 0.50],
        memory_eff=[0.80, 0.70, 0.70, 0.75, 0.70],
        m_half=[24.0, 64.0, 64.0, 8.0, 1.0],
        overhead_s=[2e-6, 3e-6, 3e-6, 4e-6, 1.5e-6],
        sharpness=[3.0] * NUM_OPS,
        comm_bw_eff=[0.9, 0.9, 0.8, 0.8],
        comm_latency_scale=[0.8, 0.8, 0.3, 1.0],
        cpu_iter_s=1e-3, cpu_per_seq_s=1e-5, cpu_per_token_s=1e-8,
        comm_s_half=[4e6] * NUM_COMMS, comm_beta=[0.45] * NUM_COMMS, comm_group_exp=[0.6] * NUM_COMMS,
        comm_overhead_s=[3e-6] * NUM_COMMS,
        pair_width=[PAIR_WIDTH_OFF, 64.0, PAIR_WIDTH_OFF, PAIR_WIDTH_OFF, PAIR_WIDTH_OFF],
        # serial floors (GEMM K loop, unsplit decode) off by default (A100's FlashAttention-2 on MHA
        # fits ~23 GB/s per thread block; H100's FlashAttention-3 splits); fits switch them on, see
        # mist.calibration.fit.fit_start
    )


def params_dirs() -> list[Path]:
    """Where fitted parameter files are looked up: the repo's calibration/params, then the wheel's."""
    here = Path(__file__).resolve()
    return [here.parents[2] / "calibration" / "params", here.parents[1] / "_bundled" / "params"]


def params_path(device_name: str) -> Path | None:
    for d in params_dirs():
        p = d / f"{device_name}.json"
        if p.exists():
            return p
    return None


def load_params(device_name: str, kind: str = "gpu", gemm_stack: str | None = None) -> tuple[CostParams, str]:
    """Fitted parameters for a device if a file exists, else defaults; returns (params, origin).

    `gemm_stack`: the GEMM parameters of that measuring software stack (a key of the file's
    params.stacks, see mist.calibration.stacks) instead of the device's default stack."""
    from ..specs.errors import SpecError

    p = params_path(device_name)
    if p is None:
        if gemm_stack is not None:
            raise SpecError(device_name, "gemm_stack", f"'{gemm_stack}': the device has no calibrated "
                            "parameters, so no GEMM stacks", "leave gemm_stack out (uncalibrated defaults)")
        return default_params(kind), "default (uncalibrated)"
    d = json.loads(p.read_text())
    block = d["params"] if "params" in d else d
    origin = d.get("origin", str(p))
    if gemm_stack is None or gemm_stack == d.get("gemm_stacks", {}).get("default"):
        return CostParams.from_dict(block, str(p)), origin
    from ..calibration.stacks import stacks_from_dict

    stacks = stacks_from_dict(block, str(p))
    if gemm_stack not in stacks:
        have = sorted(stacks) + [d.get("gemm_stacks", {}).get("default") or "the default"]
        raise SpecError(str(p), "gemm_stack", f"'{gemm_stack}': no GEMM parameters of that stack",
                        f"use one of: {', '.join(map(str, have))}")
    return stacks[gemm_stack], f"{origin}; GEMM stack {gemm_stack}"


def with_cpu_stack(params: CostParams, device_name: str, cpu_stack: str, tp: int = 1) -> CostParams:
    """`params` with the CPU-side terms that experiments/validate_e2e.py fitted end to end for a
    serving stack (a key of the device file's cpu.variants, e.g. "trtllm" or "vllm-2023": Splitwise's
    2023 vLLM). A stack that dispatches every iteration to each GPU worker (per_worker_us) pays
    iter_us + per_worker_us x tp per iteration; per_prompt_us, where fitted, per prefilled prompt;
    per_token_above_us, where fitted, per token of an iteration beyond token_knee tokens."""
    from ..specs.errors import SpecError

    p = params_path(device_name)
    d = json.loads(p.read_text()) if p is not None else {}
    cpu = (d.get("params", d)).get("cpu", {})
    variants = cpu.get("variants", {})
    if cpu_stack not in variants:
        have = sorted(variants)
        raise SpecError(device_name, "cpu_stack", f"'{cpu_stack}': no CPU terms fitted for that serving stack",
                        f"use one of: {', '.join(have)}" if have else
                        "leave cpu_stack out (no serving stack was fitted end to end for this device)")
    return dataclasses.replace(params, **cpu_fields(variants[cpu_stack], str(p), f"cpu.variants.{cpu_stack}", tp,
                                                    "re-run experiments/validate_e2e.py"))


def cpu_fields(cpu: dict, where: str, field: str, tp: int = 1, fix: str = "regenerate the file") -> dict:
    """The CostParams CPU fields (log_cpu_*, cpu_token_knee) of a "cpu" block of a parameter file (or
    one of its cpu.variants): iter_us (+ per_worker_us x tp where the stack pays one), per_seq_us,
    per_token_us, and the optional terms (absent: off). A missing or malformed key is a SpecError
    naming `where` and `field`."""
    from ..specs.errors import SpecError

    _check_cpu_terms(cpu, where, field)
    try:
        vals = ((cpu["iter_us"] + cpu.get("per_worker_us", 0.0) * tp) * 1e-6, cpu["per_seq_us"] * 1e-6,
                cpu["per_token_us"] * 1e-6, cpu.get("per_prompt_us", CPU_PROMPT_OFF * 1e6) * 1e-6,
                cpu.get("per_token_above_us", CPU_ABOVE_OFF * 1e6) * 1e-6)
        knee = float(cpu.get("token_knee", CPU_KNEE_DEFAULT))
    except (KeyError, TypeError) as e:
        raise SpecError(where, field, f"missing or malformed {e}", fix) from None
    floors = (1e-12, 1e-12, 1e-12, 1e-12, CPU_ABOVE_OFF)  # where each term is off
    logs = [jnp.asarray(np.log(max(x, lo)), jnp.float32) for x, lo in zip(vals, floors)]
    return dict(log_cpu_iter=logs[0], log_cpu_per_seq=logs[1], log_cpu_per_token=logs[2], log_cpu_per_prompt=logs[3],
                log_cpu_per_token_above=logs[4], cpu_token_knee=jnp.asarray(knee, jnp.float32))


def save_params(params: CostParams, device_name: str, meta: dict | None = None,
                directory: Path | None = None, extra: dict | None = None) -> Path:
    """Write calibration/params/<device>.json: `meta` at the top level, the parameters (and the
    `extra` keys, e.g. per-stack parameters) under "params"."""
    directory = directory or params_dirs()[0]
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / f"{device_name}.json"
    out = {"device": device_name, **(meta or {}), "params": {**params.to_dict(), **(extra or {})}}
    p.write_text(json.dumps(out, indent=2) + "\n")
    return p
