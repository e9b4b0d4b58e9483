"""Training your own model: ``geoseg train CONFIG.yaml`` (data prep, sampling, augmentation, the loop, Ray Train).

Modules: ``data`` (index sources, labels on each image's grid, split, chips), ``augment``, ``loop`` (dataset,
loss, epoch, validation; no Ray), ``card_fill`` (card from the data, measured halo), ``ray_train`` (driver and
Ray Train worker loop; imports Ray inside functions only).
"""
