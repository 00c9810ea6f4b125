"""The evaluation behind `dspark eval`: benchmark sets × drafters on the same prompts and seed, plain
decoding once per set measured side by side, and the aggregates the report and plots need."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Sequence

import numpy as np

from dspark_jax.evaluation.acceptance import AcceptanceSummary, summarize_acceptance
from dspark_jax.evaluation.datasets import DOMAIN_ORDER, Benchmark
from dspark_jax.evaluation.records import RoundRecords
from dspark_jax.evaluation.reliability import DEFAULT_BINS, PositionReliability, position_reliability
from dspark_jax.evaluation.runner import DecodeRun, decode_plain, decode_speculative
from dspark_jax.evaluation.sweep import DEFAULT_THRESHOLDS, SweepPoint, threshold_sweep
from dspark_jax.generation import GenerationConfig

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    generation: GenerationConfig = GenerationConfig(max_new_tokens=64, batch_size=1)
    confidence_threshold: float = 0.0
    sweep_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    bins: int = DEFAULT_BINS

    def __post_init__(self):
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.bins < 1:
            raise ValueError(f"bins must be >= 1, got {self.bins}")


@dataclasses.dataclass(frozen=True)
class DrafterInfo:
    label: str
    source: str
    algorithm: str
    gamma: int
    has_confidence: bool


@dataclasses.dataclass(frozen=True)
class SpecResult:
    """One drafter on one benchmark set."""
    dataset: str
    domain: str
    drafter: str
    acceptance: AcceptanceSummary
    new_tokens: int
    seconds: float
    tokens_per_s: float
    speedup: float  # over plain decoding of the same prompts in the same run
    identical_to_plain: bool | None  # greedy only: every completion equals plain decoding's
    records: RoundRecords = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class PlainResult:
    dataset: str
    new_tokens: int
    seconds: float
    tokens_per_s: float


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


@dataclasses.dataclass(frozen=True)
class SuiteResult:
    config: EvalConfig
    benchmarks: tuple[Benchmark, ...]
    drafters: tuple[DrafterInfo, ...]
    plain: tuple[PlainResult, ...]
    runs: tuple[SpecResult, ...]

    @property
    def domains(self) -> list[str]:
        present = {b.domain for b in self.benchmarks}
        return [d for d in DOMAIN_ORDER if d in present]

    def datasets_in(self, domain: str | None = None) -> list[str]:
        return [b.name for b in self.benchmarks if domain is None or b.domain == domain]

    def run(self, drafter: str, dataset: str) -> SpecResult:
        return next(r for r in self.runs if r.drafter == drafter and r.dataset == dataset)

    def macro(self, drafter: str, value: Callable[[SpecResult], float], domain: str | None = None) -> float:
        """Mean over the benchmark sets (of a domain, or all) of a per-set value: every set weighs the same."""
        return _nanmean(value(self.run(drafter, d)) for d in self.datasets_in(domain))

    def position_curve(self, drafter: str, domain: str | None = None, kind: str = "conditional_acceptance"
                       ) -> np.ndarray:
        """[G] per-position `conditional_acceptance` or `prefix_survival`, averaged over the sets (Fig. 2)."""
        curves = np.array([getattr(self.run(drafter, d).acceptance, kind) for d in self.datasets_in(domain)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a position no set verified stays NaN
            return np.nanmean(curves, axis=0)

    def reached(self, drafter: str, domain: str | None = None) -> np.ndarray:
        """[G] rounds behind `position_curve(kind="conditional_acceptance")`, summed over the sets."""
        return np.sum([self.run(drafter, d).acceptance.reached for d in self.datasets_in(domain)], axis=0)

    def records(self, drafter: str, domain: str | None = None) -> RoundRecords:
        return RoundRecords.concatenate([self.run(drafter, d).records for d in self.datasets_in(domain)])

    def reliability(self, drafter: str) -> list[PositionReliability]:
        """Per-position survival calibration over all rounds of all sets (drafters with a confidence head)."""
        r = self.records(drafter)
        return position_reliability(r.confidence, r.accept_flags, r.proposed, self.config.bins)

    def sweep(self, drafter: str, domain: str | None = None) -> list[SweepPoint]:
        return threshold_sweep(self.records(drafter, domain), self.config.sweep_thresholds)


def evaluate(target, benchmarks: Sequence[Benchmark], drafters: Sequence[tuple[str, object]],
             config: EvalConfig = EvalConfig(), log: Log | None = None) -> SuiteResult:
    """Runs plain decoding and every drafter over every set (same prompts, seed and batching)."""
    if not benchmarks:
        raise ValueError("no benchmark sets to evaluate")
    if not drafters:
        raise ValueError("no drafters to evaluate")
    labels = [label for label, _ in drafters]
    if len(set(labels)) != len(labels):
        raise ValueError(f"drafter labels must be distinct, got {labels}")
    log = log or (lambda _msg: None)
    gen = config.generation
    plain, runs = [], []
    for b in benchmarks:
        log(f"[{b.name}] plain decoding of {len(b.prompts)} prompts ...")
        p = decode_plain(target, b.prompts, gen)
        plain.append(PlainResult(b.name, p.new_tokens, p.seconds, p.tokens_per_s))
        log(f"[{b.name}] plain: {p.new_tokens} tokens, {p.tokens_per_s:.1f} tokens/s")
        for label, drafter in drafters:
            s = decode_speculative(target, drafter, b.prompts, gen, config.confidence_threshold)
            runs.append(_spec_result(b, label, s, p, greedy=gen.temperature == 0))
            r = runs[-1]
            log(f"[{b.name}] {label}: τ {r.acceptance.accept_length:.3f} over {r.acceptance.rounds} rounds, "
                f"{r.tokens_per_s:.1f} tokens/s ({r.speedup:.2f}x plain)")
    infos = tuple(DrafterInfo(label, d.source, d.config.algorithm, d.config.block_size,
                              bool(getattr(d.config, "confidence_head", False))) for label, d in drafters)
    return SuiteResult(config, tuple(benchmarks), infos, tuple(plain), tuple(runs))


def _spec_result(b: Benchmark, label: str, spec: DecodeRun, plain: DecodeRun, greedy: bool) -> SpecResult:
    return SpecResult(dataset=b.name, domain=b.domain, drafter=label, acceptance=summarize_acceptance(spec.records),
                      new_tokens=spec.new_tokens, seconds=spec.seconds, tokens_per_s=spec.tokens_per_s,
                      speedup=spec.tokens_per_s / plain.tokens_per_s,
                      identical_to_plain=(spec.token_ids == plain.token_ids) if greedy else None,
                      records=spec.records)
