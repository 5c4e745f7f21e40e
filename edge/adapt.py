"""Adaptive quantization: bits (and, when needed, the cut) from the bandwidth estimate.

The rule (DESIGN.md, "Online runtime"): for the current cut pick the highest admissible bit width
b with T_t(b) <= max(T_e, T_c), so that transmission never becomes the pipeline's slowest stage
(no transmission bubble). When even the lowest admissible b cannot keep up, switch to the cut the
plan table gives for that bandwidth level (with the plan's bits, or higher ones if they fit).
When the plan table's cut for the current bandwidth can keep up and differs from the current cut
(the link recovered after a dip made us leave it), we return to it: the plan's cut is the one
the planner found best at that bandwidth.

    T_t(b) = (payload_bytes(b) + overhead_bytes) * 8 / bandwidth + overhead_ms

Hysteresis, in the dead band between two decisions:
- down at once: when the current decision no longer fits the estimate (T_t > max(T_e, T_c): a
  bubble every period from now on), the rule is applied to the estimate immediately;
- up slowly: a decision that needs more bandwidth is taken only when the rule, applied to the
  estimate deflated by `up_margin` (estimate / (1 + up_margin)), asked for it `up_hold` times in
  a row (the same holds for returning to the plan's cut).
So a decision is kept while the estimate stays between its own need and (1 + up_margin) times the
next decision's need: noise smaller than the margin cannot flip it back and forth, and a real drop
is followed at the first estimate that shows it. Decisions are ordered by the bandwidth they need
(`need_mbps`). With up_margin = 0 and up_hold = 1 the quantizer follows the memoryless rule.

Everything is pure functions over small dataclasses, plus `AdaptiveQuantizer`, the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CutProfile:
    """What the runtime knows about one cut of the plan bundle."""

    cut_id: str
    edge_ms: float  # T_e: head time on the device
    cloud_ms: float  # T_c: tail time in the cloud
    bytes_by_bits: dict[int, int]  # admissible bit widths only -> payload bytes per request
    overhead_bytes: int = 0  # framing per request (protobuf, HTTP/2), if not in the payload
    overhead_ms: float = 0.0  # fixed per-request time on the wire (the plan's per-message overhead)

    @property
    def target_ms(self) -> float:
        """The longest transmission time that makes no bubble: max(T_e, T_c)."""
        return max(self.edge_ms, self.cloud_ms)

    def transmit_ms(self, bits: int, mbps: float) -> float:
        """T_t of this cut at `bits` over a `mbps` link."""
        if mbps <= 0:
            return float("inf")
        nbytes = self.bytes_by_bits[bits] + self.overhead_bytes
        return nbytes * 8 / (mbps * 1e3) + self.overhead_ms


@dataclass(frozen=True)
class PlanRow:
    """One bandwidth level of the plan table: at `bandwidth_mbps`, run `cut_id` at `bits`."""

    bandwidth_mbps: float
    cut_id: str
    bits: int


@dataclass(frozen=True)
class Decision:
    cut_id: str
    bits: int
    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class AdaptConfig:
    up_margin: float = 0.15  # take a decision that needs more only at estimate / (1 + margin)...
    up_hold: int = 3  # ...asked for this many estimates in a row
    return_to_plan: bool = True  # go back to the plan's cut when it can keep up again


# ---------------------------------------------------------------- pure rule


def need_mbps(cut: CutProfile, bits: int) -> float:
    """The bandwidth at which `bits` on this cut just makes no bubble (inf if never)."""
    room_ms = cut.target_ms - cut.overhead_ms
    if room_ms <= 0:
        return float("inf")
    return (cut.bytes_by_bits[bits] + cut.overhead_bytes) * 8 / (room_ms * 1e3)


def highest_fitting_bits(cut: CutProfile, mbps: float) -> int | None:
    """The highest admissible bits with T_t <= max(T_e, T_c), or None if none fits."""
    fitting = [b for b in cut.bytes_by_bits if cut.transmit_ms(b, mbps) <= cut.target_ms]
    return max(fitting) if fitting else None


def plan_row_for(plan: list[PlanRow], mbps: float) -> PlanRow:
    """The plan table row for a bandwidth: the highest level <= mbps (else the lowest level)."""
    rows = sorted(plan, key=lambda r: r.bandwidth_mbps)
    if not rows:
        raise ValueError("plan_row_for: the plan table is empty")
    chosen = rows[0]
    for row in rows:
        if row.bandwidth_mbps <= mbps:
            chosen = row
    return chosen


def decide(
    mbps: float,
    current_cut: str | None,
    cuts: dict[str, CutProfile],
    plan: list[PlanRow],
    return_to_plan: bool = True,
) -> Decision:
    """The memoryless rule: a decision for bandwidth `mbps` when running `current_cut`."""
    row = plan_row_for(plan, mbps)
    cut_id = current_cut if current_cut in cuts else row.cut_id
    bits = highest_fitting_bits(cuts[cut_id], mbps)
    if bits is None:  # even the lowest admissible bits cannot keep up: the plan's answer
        plan_cut = cuts[row.cut_id]
        bits = highest_fitting_bits(plan_cut, mbps)
        if bits is None:
            bits = row.bits if row.bits in plan_cut.bytes_by_bits else min(plan_cut.bytes_by_bits)
            why = "transmission-bound at any bits"
        else:
            why = f"{bits} bits fit"
        return Decision(row.cut_id, bits, f"cut {cut_id} cannot keep up at {mbps:.2f} Mbit/s; "
                        f"plan cut for {row.bandwidth_mbps:g} Mbit/s ({why})")
    if return_to_plan and row.cut_id != cut_id:
        plan_bits = highest_fitting_bits(cuts[row.cut_id], mbps)
        if plan_bits is not None:
            return Decision(row.cut_id, plan_bits, f"back to the plan cut for "
                            f"{row.bandwidth_mbps:g} Mbit/s; {plan_bits} bits fit at {mbps:.2f}")
    return Decision(cut_id, bits, f"highest bits with no transmission bubble at {mbps:.2f} Mbit/s")


def holds(decision: Decision, mbps: float, cuts: dict[str, CutProfile], plan: list[PlanRow],
          return_to_plan: bool = True) -> bool:
    """Can `decision` stay at this bandwidth: it makes no bubble, or nothing would do better?"""
    cut = cuts[decision.cut_id]
    if cut.transmit_ms(decision.bits, mbps) <= cut.target_ms:
        return True
    return decide(mbps, decision.cut_id, cuts, plan, return_to_plan) == decision


def next_decision(
    current: Decision | None,
    ups: int,
    mbps: float,
    cuts: dict[str, CutProfile],
    plan: list[PlanRow],
    config: AdaptConfig,
) -> tuple[Decision, int]:
    """One step of the hysteresis: (decision to use now, consecutive up-requests so far)."""
    if current is None:
        return decide(mbps, None, cuts, plan, config.return_to_plan), 0
    if not holds(current, mbps, cuts, plan, config.return_to_plan):  # a bubble: down at once
        return decide(mbps, current.cut_id, cuts, plan, config.return_to_plan), 0
    deflated = mbps / (1 + config.up_margin)
    wanted = decide(deflated, current.cut_id, cuts, plan, config.return_to_plan)
    need = lambda d: need_mbps(cuts[d.cut_id], d.bits)  # noqa: E731
    if wanted == current or need(wanted) <= need(current):
        return current, 0  # in the dead band
    if ups + 1 >= config.up_hold:
        return wanted, 0
    return current, ups + 1


# ---------------------------------------------------------------- the state


class AdaptiveQuantizer:
    """update(estimate_mbps) -> Decision, with hysteresis (see the module doc)."""

    def __init__(
        self,
        cuts: list[CutProfile],
        plan: list[PlanRow],
        config: AdaptConfig | None = None,
        initial: Decision | None = None,
    ):
        self.cuts = {c.cut_id: c for c in cuts}
        self.plan = list(plan)
        self.config = config or AdaptConfig()
        if not self.plan:
            raise ValueError("the plan table is empty")
        missing = {r.cut_id for r in self.plan} - set(self.cuts)
        if missing:
            raise ValueError(f"plan table names cuts without a profile: {sorted(missing)}")
        for c in cuts:
            if not c.bytes_by_bits:
                raise ValueError(f"cut {c.cut_id}: no admissible bit widths")
        self.decision = initial
        self._ups = 0
        self._last: float | None = None
        self.changes = 0  # how many times the decision changed (for benchmarks)

    def update(self, estimate_mbps: float | None) -> Decision:
        """Take the latest estimate and return the decision to use now.

        None, or the same value as last time (the estimator had nothing new), is no news: it
        returns the current decision and does not count towards `up_hold`, so callers may ask
        once per request even when estimates arrive less often.
        """
        if estimate_mbps is not None and estimate_mbps == self._last and self.decision is not None:
            return self.decision
        if estimate_mbps is not None:
            self._last = estimate_mbps
        if estimate_mbps is None or estimate_mbps <= 0:
            if self.decision is None:
                row = plan_row_for(self.plan, 0.0)
                sizes = self.cuts[row.cut_id].bytes_by_bits
                bits = row.bits if row.bits in sizes else min(sizes)
                why = "no estimate yet: the plan's lowest level"
                self.decision = Decision(row.cut_id, bits, why)
            return self.decision
        new, self._ups = next_decision(
            self.decision, self._ups, estimate_mbps, self.cuts, self.plan, self.config
        )
        if self.decision is not None and new != self.decision:
            self.changes += 1
        if new != self.decision:
            self.decision = new
        return self.decision
