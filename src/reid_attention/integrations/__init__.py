"""Integrations with re-ID training frameworks, one module per framework, each needing its extra.

* :mod:`reid_attention.integrations.torchreid`: deep-person-reid (``pip install
  "reid-attention[torchreid]"``): the presets and any torchvision backbone with attention as
  torchreid models, and a checkpoint loader for torch >= 2.6.

Importing a module here imports nothing from its framework; the framework is imported (or a one-line
:class:`~reid_attention._extras.MissingExtraError` raised) when a function needs it.
"""
