"""Engines run the per-block stages (``geoseg.blocks``) over work items: ``local`` in this process, ``ray`` on a
local or remote Ray cluster. ``ray`` and ``ray_train`` are the only modules of geoseg that import ray."""
