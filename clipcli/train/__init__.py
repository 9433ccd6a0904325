"""Contrastive training of CLIP models: data, loss, optimiser, the loop, and multi-process glue.

``clipcli train`` is a thin shell around :func:`clipcli.train.loop.train`; nothing here is
imported until a training command runs.
"""
