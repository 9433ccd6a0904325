"""Training CLIP and SigLIP models, with CLIP's contrastive loss or SigLIP's sigmoid loss: data,
the model being trained, losses, optimiser, the loop, and multi-process glue.

``clipcli train`` is a thin shell around :func:`clipcli.train.loop.train`; nothing here is
imported until a training command runs.
"""
