"""Training your own model: ``geoseg train CONFIG.yaml`` (data prep, sampling, augmentation, the loop, Ray Train).

Modules: ``data`` (index sources, labels on each image's grid, split, chips), ``augment``, ``loop`` (dataset,
loss, epoch, validation; no Ray), ``card_fill`` (card from the data, measured halo), ``driver`` (plan, chips per worker,
bundle; no Ray). Ray Train itself (the driver's ``train`` and the worker loop) is ``geoseg.engines.ray_train``.
"""
