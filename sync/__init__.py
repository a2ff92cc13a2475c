"""Reporting an anonymized, randomized segment ID to an aggregate-only server.

``sync.protocol`` defines the one message that may leave the device; ``sync.privacy``
randomizes it; ``sync.client`` sends it through a transport; ``sync.server`` is the
tiny server stub, which depends on ``sync.protocol`` and ``sync.privacy`` only and
never imports ``ondevice``.
"""
