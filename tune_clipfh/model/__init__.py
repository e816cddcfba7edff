"""CLIP backbones (:mod:`.registry`, :mod:`.backbone`, their weights: :mod:`.weights`,
:mod:`.pretrain`), the per-identity prompt learner (:mod:`.prompt`) and the re-identification
heads (:mod:`.heads`).

Import from the submodules: :mod:`.registry` is torch-free and read by the config schema and
the CLI, which must not pay for importing torch.
"""
