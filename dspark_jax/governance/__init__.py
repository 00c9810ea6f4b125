"""Serving governance: workload classes, tenant quotas, cost observability and automatic rollback.

    policy = load_policy("configs/policies/default.yaml")      # validated, frozen
    governor = Governor(policy)                                 # clock injectable: Governor(policy, clock=fake)
    admission = governor.admit(GovernedRequest(tenant="research", prompt_text=text, prompt_tokens=n))
    governor.record_start(admission.request_id)
    governor.record_round(admission.request_id, verified_draft=5, accepted=3, committed=4)
    governor.record_finish(admission.request_id, prompt_tokens=n, output_tokens=64, latency_s=1.2,
                           first_token_s=0.1)
    registry.register(GovernorCollector(governor))              # Prometheus (`dspark serve` GET /metrics)
    governor.write_snapshot("snapshot.json")                    # then: dspark report --snapshot snapshot.json

Modules: policy (frozen settings), policy_file (loading) / policy_validation (checking every field), classifier
(prompt -> class), quotas (token quotas), store / redis_store (where quota usage and rollback states live: this
process, or a Redis shared by replicas), costs (busy time -> cost), metrics (counters + summaries), rollback (per-
class state machine), governor (the engine-facing API), prometheus / snapshot (exposition), report (tables + plots).
"""
from dspark_jax.governance.governor import (REJECTION_CODES, REQUEST_OVERRIDES, Admission, GovernedRequest, Governor,
                                            RequestRejected)
from dspark_jax.governance.policy import GovernancePolicy
from dspark_jax.governance.policy_file import load_policy
from dspark_jax.governance.policy_validation import PolicyError, policy_from_dict
from dspark_jax.governance.rollback import SwitchEvent
from dspark_jax.governance.prometheus import GovernorCollector

__all__ = ["Admission", "GovernancePolicy", "GovernedRequest", "Governor", "GovernorCollector", "PolicyError",
           "REJECTION_CODES", "REQUEST_OVERRIDES", "RequestRejected", "SwitchEvent", "load_policy",
           "policy_from_dict"]
