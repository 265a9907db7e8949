"""Training side of imgclf: data, models, regularization, the loop, evaluation.

Needs the ``train`` extra (torch, torchvision, timm). The serving side never imports it.
"""
