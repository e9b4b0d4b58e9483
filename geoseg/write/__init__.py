"""geoseg's writers: the class-mask COG (``cog``) and the polygon layers (``vectors``).

Every writer publishes atomically: it writes a temporary name beside the target and renames it into place on
``close``/``finish``; ``abort`` removes the temporary file.
"""
