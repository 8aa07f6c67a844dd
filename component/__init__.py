"""finetune-toolkit: the layers of a run, each a subpackage, imports going down only.

config -> data -> model -> training -> tasks -> runner / inference -> cli
(.importlinter holds the contract; `lint-imports` checks it in CI).
"""
