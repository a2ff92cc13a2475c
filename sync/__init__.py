"""Reporting an anonymized, randomized segment ID to an aggregate-only server.

``sync.protocol`` defines the one message that may leave the device (and the content
table the server publishes); ``sync.privacy`` randomizes it, debiases the counts and
accounts for the privacy budget; ``sync.client`` sends it through a transport;
``sync.errors`` holds the exception tree; ``sync.server`` is the tiny server stub, which
depends on ``sync.protocol``, ``sync.privacy`` and ``sync.errors`` only and never
imports ``ondevice``.
"""
