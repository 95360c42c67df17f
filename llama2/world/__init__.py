"""The built-in world: a deterministic universe, its corpus, tasks, graders and data formats.

`llama2 world generate` writes everything the recipe needs (issue 4); see README "Built-in world".
"""
