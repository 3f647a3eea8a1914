"""The names of the tags (and the one tag-like metric) freetf writes on MLflow runs: one
place, so that writers and readers cannot drift apart."""

from __future__ import annotations

# every run
CONFIG = "freetf.config"                # the resolved config, YAML (truncated if long)
MODEL_KIND = "freetf.model_kind"        # free_transformer | baseline
LATENT_BITS = "freetf.latent_bits"      # H
CHECKPOINT = "freetf.checkpoint"        # the last persisted checkpoint
VERDICT = "freetf.verdict"              # the latent verdict (freetf.evaluation.verdicts)
OUTCOME = "freetf.outcome"              # how a sweep trial ended (tracking.runs.OUTCOMES)
VERDICT_METRIC = "eval/verdict_code"    # the verdict as a number (tracking.runs)
ERROR = "freetf.error"                  # why a trial's try failed
# a sweep's runs
SWEEP = "freetf.sweep"                  # the sweep's name, on the parent and every trial
ROLE = "freetf.role"                    # sweep (the parent) | trial
TRIAL_KEY = "freetf.trial_key"          # what identifies a trial across resumes
RAY_NODE = "freetf.ray_node"            # the Ray node the trial ran on (its last try)
SAMPLED = "freetf.sampled"              # the trial's searched values, JSON
STOPPED_EARLY = "freetf.stopped_early"  # true | false
STOP_REASON = "freetf.stop_reason"      # why the stopper or ASHA ended it
STOPPED_AT_STEP = "freetf.stopped_at_step"
# a sweep's analysis (freetf.results.analysis)
VERDICT_FIXED = "freetf.verdict_fixed"  # the per-run fixed-threshold verdict, kept beside
REGIME = "freetf.regime"                # what Z encodes (synthetic task)
BOUNDARY_CONVERGED = "freetf.boundary_converged"
KAPPA_C, KAPPA_L = "freetf.kappa_c", "freetf.kappa_l"  # on the parent: the printed boundary
