"""Evaluating drafters: acceptance, speed and confidence quality over benchmark prompts, and Sequential
Temperature Scaling of the confidence head.

Modules (one idea each):
  datasets     benchmark prompt sets by name or path, their domains, and held-out calibration prompts
  records      per-round statistics of speculative decoding as flat numpy arrays
  runner       timed plain / speculative decoding that keeps the per-round statistics
  acceptance   accept length τ, proposal length, verify rate, prefix survival, conditional acceptance
  reliability  ECE / ROC-AUC / Brier of predicted prefix survival, reliability curves
  sweep        offline static confidence-threshold sweep from one threshold-0 run
  calibration  Sequential Temperature Scaling (STS)
  suite        the evaluation over datasets × drafters (what `dspark eval` runs)
  report       JSON and markdown of a suite result
  plots        PNG figures (matplotlib Agg)
"""
