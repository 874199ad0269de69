"""The reference semantics: verdicts with traces, and the analyses built on them."""
