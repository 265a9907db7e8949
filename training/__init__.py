"""Training side of imgclf: data, models, regularization, the loop, evaluation, export, the pipeline.

Needs the ``train`` extra (torch, torchvision, timm). The serving side never imports it. A few
modules import no torch on purpose, so ``imgclf pipeline history`` runs in a serving-only install:
``training.config``, ``training.pipeline.record``, ``.config``, ``.gate`` and ``.deploy`` (that is
why ``training/pipeline/__init__.py`` is empty).
"""
