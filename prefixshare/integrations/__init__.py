"""Drop-in integrations with training libraries.

* :mod:`prefixshare.integrations.trl`: ``PrefixShareDPOTrainer``, TRL's ``DPOTrainer`` with prefix sharing
  (needs ``trl``; imported only when this submodule is).
"""
