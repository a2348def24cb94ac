"""Integrations with re-ID training frameworks, one module per framework, each needing its extra.

* :mod:`reid_attention.integrations.torchreid`: deep-person-reid (``pip install
  "reid-attention[torchreid]"``): the presets and any torchvision backbone with attention as
  torchreid models, and a checkpoint loader for torch >= 2.6.
* :mod:`reid_attention.integrations.fastreid`: fast-reid (``pip install "reid-attention[fastreid]"``,
  then ``pip install --no-deps fastreid==1.4.0``): the presets and a generic attention backbone in
  fast-reid's ``BACKBONE_REGISTRY``, built from fast-reid's own config keys, and
  ``patch_for_torch2()``, the opt-in shims fast-reid 1.4.0 needs on torch 2 and Python >= 3.10.

Importing a module here imports nothing from its framework; the framework is imported (or a one-line
:class:`~reid_attention._extras.MissingExtraError` raised) when a function needs it.
"""
