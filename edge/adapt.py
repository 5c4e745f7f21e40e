"""Adaptive quantization: bits (and, when needed, the cut) from the bandwidth estimate.

The rule (DESIGN.md, "Online runtime"): for the current cut pick the highest admissible bit width
b with T_t(b) <= max(T_e, T_c) (T_e: the edge stage per input, the source's own work included),
so that transmission never becomes the pipeline's slowest stage (no transmission bubble). Among
the widths that fit, one refinement (`fitting_bits`, rule "least-drop", the default): where the plan
measured the same least drop for fewer bits, the fewest of those bits are sent, since the higher
ones buy no accuracy and cost transfer time (latency) on every request; rule "highest" is the
literal rule. When
even the lowest admissible b cannot keep up, switch to the cut the plan table gives for that
bandwidth level (with the plan's bits, or higher ones if they fit). When the plan table's cut
for the current bandwidth can keep up and differs from the current cut (the link recovered after
a dip made us leave it), we return to it: the plan's cut is the one the planner found best at
that bandwidth. The plan's levels are discrete, though: where another
of the plan's cuts (edge-only included) makes no bubble at the estimate with a period shorter by
more than a margin, that cut is taken instead (`shortest_fitting`; the planner's own objective,
minimum period, then minimum latency, at the live estimate and stage times). Periods within the
margin of each other count as equal, and the expected latency decides among them, with the
semantic cache's live hit rate in it: a cut whose cache answers 40% of the inputs saves those
inputs the transfer and the tail, which the period (bound by the edge stage) does not show.

    T_t(b) = (payload_bytes(b) + overhead_bytes) * 8 / bandwidth + overhead_ms

Hysteresis, in the dead band between two decisions:
- down at once: when the current decision no longer fits the estimate (T_t > max(T_e, T_c): a
  bubble every period from now on), the rule is applied to the estimate immediately;
- up slowly: a decision that needs more bandwidth is taken only when the rule, applied to the
  estimate deflated by `up_margin` (estimate / (1 + up_margin)), asked for it `up_hold` times in
  a row (the same holds for returning to the plan's cut).
So a decision is kept while the estimate stays between its own need and (1 + up_margin) times the
next decision's need: noise smaller than the margin cannot flip it back and forth, and a real drop
is followed at the first estimate that shows it. One exception to "up slowly": a cut with a
shorter period whose need at its lowest bits is under the deflated estimate by `leave_factor` is
taken at once (a slow cut costs throughput every period, and an estimate that far above the need
is no threshold noise). Another: a cut the rule prefers that needs no more bandwidth than the
current decision is taken at once (no bubble can come of it; only fewer bits on the same cut wait
in the dead band). Decisions are ordered by the bandwidth they need (`need_mbps`). With
up_margin = 0 and up_hold = 1 the quantizer follows the memoryless rule.

Banked accuracy (an extension of the rule; off when no `AccuracyBank` is given). The accuracy
budget holds for the answers as a whole, not for each one. While the link has room, the rule sends
at the highest admissible bits, whose measured drop is below the budget: the difference is kept in
a bank (the decayed sum of the plan's measured drops of the answers given, against the budget times
their decayed count; horizon `window` answers). When no admissible width keeps up with the link,
a measured width below the admissible ones may be sent, if the bank can pay its drop, and if it
gives a shorter period than the plan's answer for that bandwidth (its cut at the admissible bits).
So the running drop of the answers stays within the budget while dips are ridden out at the cut's
compute-bound period instead of a transmission-bound one or a slower cut.

Everything is pure functions over small dataclasses, plus `AdaptiveQuantizer`, the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


BITS_RULES = ("least-drop", "highest")  # how fitting_bits picks among the widths that keep up
DEFAULT_BITS_RULE = BITS_RULES[0]


@dataclass(frozen=True)
class CutProfile:
    """What the runtime knows about one cut of the plan bundle."""

    cut_id: str
    edge_ms: float  # T_e: head time on the device
    cloud_ms: float  # T_c: tail time in the cloud
    bytes_by_bits: dict[int, int]  # admissible bit widths only -> payload bytes per request
    overhead_bytes: int = 0  # framing per request (protobuf, HTTP/2), if not in the payload
    overhead_ms: float = 0.0  # fixed per-request time on the wire (the plan's per-message overhead)
    below_bytes: dict[int, int] = field(default_factory=dict)  # measured widths under the admissible ones
    # the plan's measured drop (points) per width; for the widths below the admissible ones, what the bank
    # pays: its upper confidence bound (drop_upper_bound)
    drop_by_bits: dict[int, float] = field(default_factory=dict)
    # per-input edge work before any head, the same for every cut (reading and preprocessing the
    # source: GesFi's CSI-to-image): part of the edge stage, so part of T_e
    input_ms: float = 0.0
    # which of the widths that keep up is sent (`fitting_bits`): "least-drop", the fewest bits among
    # those with the least measured drop; "highest", the highest width (the rule as first written)
    bits_rule: str = DEFAULT_BITS_RULE
    # share of the inputs at this cut the semantic cache answers (no transfer, no cloud): the plan's
    # held-out figure at first, then the live one; 0 without a cache
    hit_rate: float = 0.0

    @property
    def target_ms(self) -> float:
        """The longest transmission time that makes no bubble: max(T_e, T_c), T_e = input + head."""
        return max(self.input_ms + self.edge_ms, self.cloud_ms)

    def transmit_ms(self, bits: int, mbps: float) -> float:
        """T_t of this cut at `bits` over a `mbps` link."""
        if mbps <= 0:
            return float("inf")
        return (self.payload(bits) + self.overhead_bytes) * 8 / (mbps * 1e3) + self.overhead_ms

    def payload(self, bits: int) -> int:
        """Payload bytes per request at `bits` (admissible, or one of the widths below them)."""
        return self.bytes_by_bits[bits] if bits in self.bytes_by_bits else self.below_bytes[bits]

    def period_ms(self, bits: int, mbps: float) -> float:
        """The pipeline period of this cut at `bits`: max(T_e, T_t, T_c)."""
        return max(self.target_ms, self.transmit_ms(bits, mbps))

    def latency_ms(self, bits: int, mbps: float) -> float:
        """The expected latency of an input at `bits` (DESIGN's L = T_e + T_t + T_c, with the cache):
        the edge stage for every input; transfer and tail only for those the cache does not answer."""
        if not any(self.bytes_by_bits.values()):  # edge-only: nothing crosses the link
            return self.input_ms + self.edge_ms
        return self.input_ms + self.edge_ms + (1 - self.hit_rate) * (self.transmit_ms(bits, mbps) + self.cloud_ms)

    def drop(self, bits: int) -> float:
        """The plan's measured accuracy drop (points, >= 0) at `bits`; 0 where nothing was measured."""
        return max(0.0, self.drop_by_bits.get(bits, 0.0))

    def drop_bound(self, bits: int) -> float | None:
        """What the plan's measurements say of the drop at `bits`: the measured drop, else that of the
        nearest measured width below it (fewer bits lose at least as much: the planner's own
        bracketing of the widths it did not measure); None where no width at or below was measured."""
        below = [b for b in self.drop_by_bits if b <= bits]
        return self.drop(max(below)) if below else None


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
class AccuracyBank:
    """The running accuracy drop of the answers given so far, against the budget (see the module doc).

    `spent` and `count` are decayed sums (factor 1 - 1/window per answer) of the drops (points) and of
    the answers, so a long good spell cannot pay for an arbitrarily long bad one."""

    budget: float  # points of top-1 agreement with the full model
    window: float = 200.0  # horizon of the decay, in answers
    spent: float = 0.0
    count: float = 0.0

    @property
    def keep(self) -> float:
        return 1.0 - 1.0 / max(self.window, 1.0)


def drop_upper_bound(drop: float, samples: int, z: float = 1.645) -> float:
    """One-sided upper confidence bound (z = 1.645: 95%) of an accuracy drop (points) that the plan
    measured on `samples` calibration inputs (normal approximation, at least one input's worth of
    error). The bank pays this for the widths below the admissible ones, so that a lucky calibration
    set does not let it overspend the budget."""
    n = max(int(samples), 1)
    p = min(max(drop, 100.0 / n), 100.0) / 100.0
    return max(drop, 0.0) + z * 100.0 * (p * (1.0 - p) / n) ** 0.5


def affords(bank: AccuracyBank, drop: float) -> bool:
    """Can the next answer have this drop with the running drop staying within the budget?"""
    return bank.spent * bank.keep + drop <= bank.budget * (bank.count * bank.keep + 1.0) + 1e-12


def spend(bank: AccuracyBank, drop: float) -> AccuracyBank:
    """The bank after one more answer with this drop."""
    return replace(bank, spent=bank.spent * bank.keep + max(0.0, drop), count=bank.count * bank.keep + 1.0)


@dataclass(frozen=True)
class AdaptConfig:
    up_margin: float = 0.15  # take a decision that needs more only at estimate / (1 + margin)...
    up_hold: int = 3  # ...asked for this many estimates in a row
    return_to_plan: bool = True  # go back to the plan's cut when it can keep up again
    # take another cut whose period is shorter by this much (`shortest_fitting`); None: the plan table
    # alone says which cut (how the baselines run: their own planners' choices)
    period_margin: float | None = 0.1
    # a cut with a shorter period whose need (at its lowest bits) is under estimate / (1 + margin) /
    # leave_factor is taken at once (leaving a slow cut costs throughput every period; more bits only
    # cost accuracy when wrong)
    leave_factor: float = 2.0


# ---------------------------------------------------------------- pure rule


def need_mbps(cut: CutProfile, bits: int) -> float:
    """The bandwidth at which `bits` on this cut just makes no bubble (inf if never)."""
    room_ms = cut.target_ms - cut.overhead_ms
    if room_ms <= 0:
        return float("inf")
    return (cut.payload(bits) + cut.overhead_bytes) * 8 / (room_ms * 1e3)


def fitting_bits(cut: CutProfile, mbps: float) -> int | None:
    """The admissible width to send at `mbps`: of those with T_t <= max(T_e, T_c), the fewest bits
    whose measured drop (`drop_bound`) is the least among them (rule "least-drop"), or the highest
    (rule "highest", and wherever nothing was measured). The highest width is there for accuracy;
    where the plan measured the same drop with fewer bits, the extra bits buy none and cost transfer
    time on every request (latency, and slack lost when the link dips). None if none fits."""
    fitting = [b for b in cut.bytes_by_bits if cut.transmit_ms(b, mbps) <= cut.target_ms]
    if not fitting:
        return None
    known = {b: d for b in fitting if (d := cut.drop_bound(b)) is not None}
    if cut.bits_rule == "highest" or not known:
        return max(fitting)
    least = min(known.values())
    return min(b for b, d in known.items() if d <= least)


def overdrawn(cut: CutProfile, bits: int, bank: AccuracyBank | None) -> bool:
    """Is `bits` a width below the admissible ones that the bank can no longer pay for?"""
    return bits in cut.below_bytes and (bank is None or not affords(bank, cut.drop(bits)))


def banked_bits(cut: CutProfile, mbps: float, bank: AccuracyBank | None) -> int | None:
    """The highest width below the admissible ones that keeps up with the link and that the bank can pay."""
    if bank is None:
        return None
    fitting = [b for b in cut.below_bytes
               if cut.transmit_ms(b, mbps) <= cut.target_ms and affords(bank, cut.drop(b))]
    return max(fitting) if fitting else None


def plan_row_for(plan: list[PlanRow], mbps: float) -> PlanRow:
    """The plan table row for a bandwidth: the highest level <= mbps (else the lowest level)."""
    rows = _levels(plan, "plan_row_for")
    chosen = rows[0]
    for row in rows:
        if row.bandwidth_mbps <= mbps:
            chosen = row
    return chosen


def starting_row(plan: list[PlanRow]) -> PlanRow:
    """Where to start before any estimate: the plan's median bandwidth level (the lower middle one).

    Not the lowest level: there the plan runs nearly the whole model on the edge and sends almost
    nothing, so the estimator gets nothing to measure and the up-switch waits on probes. From the
    middle level the first answers calibrate the estimator, and a link that cannot keep up is left
    at once (the down-switch needs one estimate, or the stall bound during an outage)."""
    rows = _levels(plan, "starting_row")
    return rows[(len(rows) - 1) // 2]


def _levels(plan: list[PlanRow], who: str) -> list[PlanRow]:
    """The plan table's rows by increasing bandwidth (an empty table is an error)."""
    rows = sorted(plan, key=lambda r: r.bandwidth_mbps)
    if not rows:
        raise ValueError(f"{who}: the plan table is empty")
    return rows


def decide(
    mbps: float,
    current_cut: str | None,
    cuts: dict[str, CutProfile],
    plan: list[PlanRow],
    return_to_plan: bool = True,
    bank: AccuracyBank | None = None,
    margin: float | None = 0.1,
) -> Decision:
    """The memoryless rule: a decision for bandwidth `mbps` when running `current_cut`.

    The plan table's levels are discrete and the estimate is not: between two levels, the row's
    cut may be slower than another of the plan's cuts at the estimate (a deep cut planned for an
    outage, kept while the link is back at 20 times that). So the rule's answer is replaced by the
    cut with the shortest period among those that make no transmission bubble (edge-only
    included; near ties by the expected latency), when that period is shorter by more than
    `margin` (`shortest_fitting`; None: never).
    With `return_to_plan` off the current cut is kept while some of its bits fit, as before."""
    row = plan_row_for(plan, mbps)
    cut_id = current_cut if current_cut in cuts else row.cut_id
    bits = fitting_bits(cuts[cut_id], mbps)
    if bits is None:  # even the lowest admissible bits cannot keep up: the plan's answer
        return shortest_fitting(_when_behind(mbps, cut_id, row, cuts, bank), mbps, cuts, margin)
    d = Decision(cut_id, bits,
                 f"{bits} bits: no transmission bubble at {mbps:.2f} Mbit/s ({cuts[cut_id].bits_rule})")
    if not return_to_plan:
        return d
    if row.cut_id != cut_id:
        plan_bits = fitting_bits(cuts[row.cut_id], mbps)
        if plan_bits is not None:
            d = Decision(row.cut_id, plan_bits, f"back to the plan cut for "
                         f"{row.bandwidth_mbps:g} Mbit/s; {plan_bits} bits fit at {mbps:.2f}")
    return shortest_fitting(d, mbps, cuts, margin)


def _when_behind(mbps: float, cut_id: str, row: PlanRow, cuts: dict[str, CutProfile],
                 bank: AccuracyBank | None) -> Decision:
    """The current cut cannot keep up at any admissible bits: the plan row's cut (at bits that fit,
    or its own), or a width below the admissible ones on the current cut if the bank pays for it
    and its period is shorter."""
    plan_cut = cuts[row.cut_id]
    bits = fitting_bits(plan_cut, mbps)
    if bits is None:
        bits = row.bits if row.bits in plan_cut.bytes_by_bits else min(plan_cut.bytes_by_bits)
        why = "transmission-bound at any bits"
    else:
        why = f"{bits} bits fit"
    planned = Decision(row.cut_id, bits, f"cut {cut_id} cannot keep up at {mbps:.2f} Mbit/s; "
                       f"plan cut for {row.bandwidth_mbps:g} Mbit/s ({why})")
    below = banked_bits(cuts[cut_id], mbps, bank)
    if below is not None and cuts[cut_id].period_ms(below, mbps) < plan_cut.period_ms(bits, mbps):
        return Decision(cut_id, below, f"no admissible bits keep up at {mbps:.2f} Mbit/s; "
                        f"{below} bits on banked accuracy")
    return planned


def shortest_fitting(d: Decision, mbps: float, cuts: dict[str, CutProfile],
                     margin: float | None = 0.1) -> Decision:
    """`d`, or a cut that makes no transmission bubble at `mbps` at some admissible bits and whose
    period is shorter than d's by more than `margin` (None: d). Of those, the planner's objective:
    minimise P, then L. Periods within `margin` of the shortest count as equal (the stage times
    are measured, and noisy by more than a few percent), and of these the one with the least
    expected latency (`CutProfile.latency_ms`: the semantic cache's hits in it) is taken."""
    if margin is None:
        return d
    period = cuts[d.cut_id].period_ms(d.bits, mbps)
    fitting = {c.cut_id: bits for c in cuts.values() if (bits := fitting_bits(c, mbps)) is not None
               and c.target_ms < period / (1 + margin)}
    if not fitting:
        return d
    shortest = min(cuts[cid].target_ms for cid in fitting)
    ties = [cid for cid in fitting if cuts[cid].target_ms <= shortest * (1 + margin)]
    best = min(ties, key=lambda cid: (cuts[cid].latency_ms(fitting[cid], mbps), cuts[cid].target_ms))
    c, bits = cuts[best], fitting[best]
    return Decision(best, bits, f"cut {best} at {bits} bits: period {c.target_ms:.1f} ms, latency "
                    f"{c.latency_ms(bits, mbps):.1f} ms vs period {period:.1f} ms for {d.cut_id} at "
                    f"{mbps:.2f} Mbit/s ({d.reason})")


def holds(decision: Decision, mbps: float, cuts: dict[str, CutProfile], plan: list[PlanRow],
          return_to_plan: bool = True, bank: AccuracyBank | None = None, margin: float | None = 0.1) -> bool:
    """Can `decision` stay at this bandwidth: it makes no bubble (and, below the admissible widths,
    the bank still pays for it), or nothing would do better?"""
    cut = cuts[decision.cut_id]
    if overdrawn(cut, decision.bits, bank):
        return False
    if cut.transmit_ms(decision.bits, mbps) <= cut.target_ms:
        return True
    return decide(mbps, decision.cut_id, cuts, plan, return_to_plan, bank, margin) == decision


def settled(decision: Decision, cuts: dict[str, CutProfile], plan: list[PlanRow], config: AdaptConfig,
            bank: AccuracyBank | None = None) -> bool:
    """Could no higher estimate change `decision`? The rule gives the same cut and bits at an
    unbounded bandwidth (every width fits there). Then the link only needs watching for a fall, which
    the requests show themselves: one that queues behind the one before is an estimator sample, and
    an overdue one a stall."""
    top = decide(float("inf"), decision.cut_id, cuts, plan, config.return_to_plan, bank, config.period_margin)
    return (top.cut_id, top.bits) == (decision.cut_id, decision.bits)


def next_decision(
    current: Decision | None,
    ups: int,
    mbps: float,
    cuts: dict[str, CutProfile],
    plan: list[PlanRow],
    config: AdaptConfig,
    bank: AccuracyBank | None = None,
    fresh: bool = True,
) -> tuple[Decision, int]:
    """One step of the hysteresis: (decision to use now, consecutive up-requests so far).

    `fresh` False: the same estimate as last time (only the stage times moved): it may take the
    decision down, or to a much shorter period at once, but it is no new up-request."""
    if current is None:
        return decide(mbps, None, cuts, plan, config.return_to_plan, bank, config.period_margin), 0
    if not holds(current, mbps, cuts, plan, config.return_to_plan, bank, config.period_margin):  # down at once
        return decide(mbps, current.cut_id, cuts, plan, config.return_to_plan, bank, config.period_margin), 0
    deflated = mbps / (1 + config.up_margin)
    wanted = decide(deflated, current.cut_id, cuts, plan, config.return_to_plan, bank, config.period_margin)
    need = lambda d: need_mbps(cuts[d.cut_id], d.bits)  # noqa: E731
    if wanted == current:
        return current, 0
    if need(wanted) <= need(current):
        if wanted.cut_id != current.cut_id:
            return wanted, 0  # a cut the rule prefers (period, then latency) that needs no more: at once
        return current, 0  # fewer bits on the same cut, while the current ones fit: the dead band
    least = need_mbps(cuts[wanted.cut_id], min(cuts[wanted.cut_id].bytes_by_bits))
    if (cuts[wanted.cut_id].target_ms < cuts[current.cut_id].target_ms / (1 + config.up_margin)
            and least * config.leave_factor <= deflated):
        return wanted, 0  # a shorter period with the link far above its need: no reason to wait
    if not fresh:
        return current, ups
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
        bank: AccuracyBank | None = None,
    ):
        self.cuts = {c.cut_id: c for c in cuts}
        self.bank = bank  # None: never below the admissible widths
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
        does not count towards `up_hold`, so callers may ask once per request even when estimates
        arrive less often (the same value is still checked against the stage times, which move:
        it can take the decision down, or to a much shorter period). A decision below the admissible
        widths is left as soon as the bank can no longer pay for it, news or not.
        """
        if self.decision is not None and self._last is not None and self._overdrawn():
            return self._step(self._last)
        if estimate_mbps is not None and estimate_mbps <= 0 and self.decision is not None:
            estimate_mbps = 1e-6  # a measured outage: as little as can be (before any decision: no news)
        if estimate_mbps is not None and estimate_mbps == self._last and self.decision is not None:
            return self._step(estimate_mbps, fresh=False)  # the stage times may have moved
        if estimate_mbps is not None:
            self._last = estimate_mbps
        if estimate_mbps is None or estimate_mbps <= 0:
            if self.decision is None:
                row = starting_row(self.plan)
                sizes = self.cuts[row.cut_id].bytes_by_bits
                bits = row.bits if row.bits in sizes else min(sizes)
                why = f"no estimate yet: the plan's median level ({row.bandwidth_mbps:g} Mbit/s)"
                self.decision = Decision(row.cut_id, bits, why)
            return self.decision
        return self._step(estimate_mbps)

    def record(self, cut_id: str, bits: int | None) -> None:
        """One answer was given: sent on `cut_id` at `bits`, or computed in full on the edge (bits None)."""
        if self.bank is not None:
            drop = 0.0 if bits is None or cut_id not in self.cuts else self.cuts[cut_id].drop(bits)
            self.bank = spend(self.bank, drop)

    def settled(self) -> bool:
        """No higher estimate could change the current decision (`settled`); False before one."""
        d = self.decision
        return d is not None and d.cut_id in self.cuts and settled(d, self.cuts, self.plan, self.config, self.bank)

    def _overdrawn(self) -> bool:
        d = self.decision
        cut = self.cuts.get(d.cut_id) if d is not None else None
        return cut is not None and overdrawn(cut, d.bits, self.bank)

    def _step(self, estimate_mbps: float, fresh: bool = True) -> Decision:
        new, self._ups = next_decision(
            self.decision, self._ups, estimate_mbps, self.cuts, self.plan, self.config, self.bank, fresh
        )
        if self.decision is not None and new != self.decision:
            self.changes += 1
        self.decision = new
        return self.decision
