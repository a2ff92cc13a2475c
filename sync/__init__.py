"""Reporting an anonymized, randomized segment ID to an aggregate-only server.

``ondevice_sync`` is the import name; the source lives in the repository folder ``sync/``
(the distribution maps one to the other). Its modules:

- ``protocol``: the one message that may leave the device, and the content table the
  server publishes;
- ``privacy``: randomizes it, debiases the counts, accounts for the privacy budget;
- ``client``: sends it through a transport; ``errors``: the exception tree;
- ``ohttp``, ``gateway``, ``relay``: carry reports through Oblivious HTTP;
  ``ratelimit`` counts requests per address;
- ``server``: the tiny server stub. It never imports ``ondevice``.

As a library should, the package attaches a ``NullHandler`` to its logger: nothing is
printed unless the application configures logging.
"""

import logging as _logging

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
