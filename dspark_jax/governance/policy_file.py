"""Loading and validating a governance policy from a YAML file, a Python file or a plain dict.

Every error is a `PolicyError` naming the file and the field, e.g.
    policy.yaml: classes.code.max_draft: must be an integer in [0, 7] (0..gamma), got 9

File schema (YAML; a Python file defines `POLICY` as the same structure as a dict, or as a GovernancePolicy):

    version: 1                     # optional; only 1 exists
    gamma: 7                       # required: drafter block size, upper bound of every max_draft
    cost_per_hour_usd: 300.0       # required: all-in serving cost of the pool per hour
    class_defaults: {...}          # optional: any class field; every class starts from these values
    classes:                       # required, at least one
      <name>:
        speculate: true            # default true
        max_draft: 7               # 0..gamma, default gamma
        confidence_floor: 0.0      # 0..1
        scheduler_mode: hardware_aware   # hardware_aware | static_threshold | fixed | off
        max_prompt_tokens: 8192    # context budget; null = unlimited (default)
        allow_overrides: [max_draft, temperature]   # see policy.OVERRIDABLE; default []
        sampling:                  # each field optional
          default_temperature: 0.0
          max_temperature: 2.0
          default_top_p: 1.0
          top_p_range: [0.0, 1.0]
          default_top_k: 0
          max_top_k: null          # null = any top_k (0 = off allowed); N = top_k in [1, N]
          default_max_new_tokens: 512
          max_new_tokens: 4096
        rollback:                  # optional; null = never rolled back
          metric: acceptance       # acceptance | p95_latency_s
          threshold: 0.3           # required
          window: 100              # rounds (acceptance) or requests (p95_latency_s)
          probation_s: 300
          probe_fraction: 0.1      # (0, 1]
          probe_window: 100        # default: window
        description: "..."
    tenants:                       # required, at least one
      <name>:
        classes: [code, chat]      # or "*" for every class
        default_class: chat        # optional; default: the classifier's default if allowed, else the first class
        quotas:                    # optional; none = unlimited
          - {tokens: 100000, window_s: 3600, count: total}   # count: total (prompt + output) | output
        description: "..."
    classifier:                    # optional
      default_class: chat          # default: 'chat' if defined, else the first class
      rules:                       # default: classifier.DEFAULT_RULES for the classes the policy defines
        - {class: code, patterns: ['```', '\\bdef \\w+\\(']}
    store:                         # optional: where quota usage and rollback states live
      url: memory                  # memory (this process) | redis://host:port/db (shared by replicas)
      on_error: reject             # reject | allow: admission while Redis is unreachable
      lease_s: 30                  # an unrenewed reservation (its replica died) is given back after this
      sync_s: 0.5                  # replicas re-read the shared rollback states this often
      key_prefix: dspark
"""
from __future__ import annotations

import runpy
from pathlib import Path

from dspark_jax.governance.policy import GovernancePolicy
from dspark_jax.governance.policy_validation import PolicyError, policy_from_dict


DEFAULT_POLICY = Path(__file__).with_name("policies") / "default.yaml"  # in the package: any working directory


def load_policy(path: str | Path) -> GovernancePolicy:
    """Loads and validates a policy from a .yaml/.yml file or a .py file defining `POLICY`; "default" (where no
    file of that name exists) is the shipped policy, `DEFAULT_POLICY` (the repository's
    configs/policies/default.yaml links to it). Raises FileNotFoundError / PolicyError naming the file."""
    path = DEFAULT_POLICY if str(path) == "default" and not Path("default").exists() else Path(path).expanduser()
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy file not found: {source}")
    if path.suffix in (".yaml", ".yml"):
        import yaml
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise PolicyError(f"{source}{where}: malformed YAML: {problem}") from None
        if data is None:
            raise PolicyError(f"{source}: the policy file is empty")
        return policy_from_dict(data, source)
    if path.suffix == ".py":
        try:
            namespace = runpy.run_path(str(path))
        except Exception as e:  # noqa: BLE001 -- any error in the admin's file becomes one clear message
            raise PolicyError(f"{source}: error while executing the policy file: {type(e).__name__}: {e}") from None
        if "POLICY" not in namespace:
            raise PolicyError(f"{source}: defines no POLICY (a dict in the policy schema, or a GovernancePolicy)")
        policy = namespace["POLICY"]
        if isinstance(policy, GovernancePolicy):
            return policy
        return policy_from_dict(policy, source)
    raise PolicyError(f"{source}: unsupported policy file type {path.suffix!r} (expected .yaml, .yml or .py)")
