"""Merge search over a model zoo: where each model's change lives and what merges with what (`similarity`,
`inspect`), candidates scored in one batched pass of the dynamic model (`proxy`), the selection strategies
of Model-GLUE and M³ (`strategies`), and the whole Model-GLUE recipe (`glue`)."""
