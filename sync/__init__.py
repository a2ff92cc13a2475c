"""Reporting an anonymized, randomized segment ID to an aggregate-only server.

``sync.protocol`` defines the one message that may leave the device (and the content
table the server publishes); ``sync.privacy`` randomizes it, debiases the counts and
accounts for the privacy budget; ``sync.client`` sends it through a transport;
``sync.errors`` holds the exception tree; ``sync.ohttp``, ``sync.gateway`` and
``sync.relay`` carry reports through Oblivious HTTP; ``sync.ratelimit`` counts requests
per address. ``sync.server`` is the tiny server stub; it never imports ``ondevice``.

As a library should, the package attaches a ``NullHandler`` to its logger: nothing is
printed unless the application configures logging.
"""

import logging as _logging

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
