"""finetune-toolkit: the layers of a run, each a subpackage, imports going down only.

config -> data -> model -> training -> tasks -> runner / inference -> cli
(the contract is [tool.importlinter] in pyproject.toml; `lint-imports` checks it in CI).
"""
