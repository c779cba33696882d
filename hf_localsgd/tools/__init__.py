"""The `hf-localsgd` command's tools: `cli` (the dispatcher), `plot` (figures from a run's logs) and `advise`
(is local SGD worth it on this link, and with which H)."""
