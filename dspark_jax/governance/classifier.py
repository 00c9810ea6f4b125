"""Assigning a workload class to a prompt with ordered keyword / regular-expression rules.

Rules are tried in order and the first rule with a matching pattern wins (patterns are searched,
case-insensitive, multi-line). Rules for classes the tenant may not use are skipped; when no rule matches, the
classifier's default class is used if the tenant may use it, else the tenant's default class. Long prompts are
judged on their first and last `HEAD_TAIL_CHARS` characters (instructions sit at either end), which also bounds
the regex work per request.
"""
from __future__ import annotations

import re
from typing import Collection

from dspark_jax.governance.policy import ClassifierConfig, ClassifierRule

HEAD_TAIL_CHARS = 8192

DEFAULT_RULES: tuple[ClassifierRule, ...] = (
    # Regulated first: a conservative class must win over any other match.
    ClassifierRule("regulated", (
        r"\b(diagnos\w*|prescri\w*|dosage|medical advice|legal advice|lawsuit|litigation|tax advice|"
        r"investment advice|financial advice|hipaa|gdpr|compliance)\b",)),
    ClassifierRule("code", (
        r"```",
        r"^\s*(def|class|import|from|function|fn|func|public|private|#include)\b",
        r"\b(write|fix|debug|refactor|implement|review)\b[^\n]{0,40}\b(code|function|script|program|class|"
        r"method|bug|query)\b",
        r"\b(python|javascript|typescript|java|rust|golang|sql|bash|c\+\+)(?!\w)",)),
    ClassifierRule("extraction", (
        r"\b(extract|parse|as json|to json|into json|json schema|csv|named entit\w*|fill in the (fields|form))\b",)),
    ClassifierRule("math", (
        r"\b(solve|calculate|compute|equation|integral|derivative|prove|how (many|much))\b",
        r"\d+\s*[-+*/^]\s*\d+\s*=",)),
    ClassifierRule("summarization", (
        r"\b(summari[sz]e|summary|tl;?dr|key points|main points|condense)\b",)),
    ClassifierRule("creative", (
        r"\b(poem|story|stories|lyrics|haiku|fiction|novel|screenplay|limerick|sonnet)\b",)),
)
"""Built-in rules, used (for the classes a policy defines) when the policy lists no classifier rules."""


class PromptClassifier:
    """Compiled classifier rules."""

    def __init__(self, config: ClassifierConfig):
        self.default_class = config.default_class
        self._rules = [(r.workload_class, [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in r.patterns])
                       for r in config.rules]

    def classify(self, prompt_text: str, allowed: Collection[str] | None = None,
                 tenant_default: str | None = None) -> str:
        """The class of `prompt_text` among `allowed` classes (all when None); see the module docstring."""
        text = prompt_text
        if len(text) > 2 * HEAD_TAIL_CHARS:
            text = text[:HEAD_TAIL_CHARS] + "\n" + text[-HEAD_TAIL_CHARS:]
        for workload_class, patterns in self._rules:
            if allowed is not None and workload_class not in allowed:
                continue
            if any(p.search(text) for p in patterns):
                return workload_class
        if allowed is None or self.default_class in allowed or tenant_default is None:
            return self.default_class
        return tenant_default
