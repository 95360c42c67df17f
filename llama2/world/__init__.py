"""The built-in world: a deterministic universe, its corpus, tasks, graders and simulated annotators.

It stands in for Meta's data and human annotators so that the whole recipe can be run, measured
and tested without downloads. Nothing in the core or the engine imports it: the recipes are handed
its files, and the graders reach the reward code only by name (`helpfulness_rm=grader`).
`llama2 world generate` writes everything the recipe needs.
"""
