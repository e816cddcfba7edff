"""Data layer: synthetic data (:mod:`.synth`), dataset preparation into manifests
(:mod:`.hands11k`, :mod:`.hd`, :mod:`.manifest`), the decode-once image store (:mod:`.store`),
batches on the device (:mod:`.loader`) and samplers (:mod:`.sampler`).

Import from the submodules: the CLI's parser reads :mod:`.manifest` without importing torch.
"""
