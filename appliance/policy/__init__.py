"""Pure policy decisions: (identity, target, request) -> allow | block | approve | mask.

Nothing here does I/O. See docs/policy.md for the rule syntax and precedence.
"""

from appliance.policy.config import MaskingSettings, MaskSpec, PolicyConfig, Rule
from appliance.policy.engine import PolicyEngine, SqlSessionState
from appliance.policy.explain import Explanation, LintFinding, explain, lint
from appliance.policy.k8s import K8sRequest
from appliance.policy.sql import BatchAnalysis, StatementAnalysis, analyze_sql
from appliance.policy.ssh import SshRequest
from appliance.policy.types import ACTION_STRENGTH, ALLOW, Action, ColumnDesc, MaskPlan, PolicyError, Verdict

__all__ = [
    "ACTION_STRENGTH", "ALLOW", "Action", "BatchAnalysis", "ColumnDesc", "Explanation", "K8sRequest", "LintFinding",
    "MaskPlan", "MaskSpec", "MaskingSettings", "PolicyConfig", "PolicyEngine", "PolicyError", "Rule",
    "SqlSessionState", "SshRequest", "StatementAnalysis", "Verdict", "analyze_sql", "explain", "lint",
]
