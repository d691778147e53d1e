"""Drop-in integrations with training libraries.

* :mod:`prefixshare.integrations.trl`: ``PrefixShareDPOTrainer`` and ``PrefixShareRewardTrainer``, TRL's
  ``DPOTrainer`` and ``RewardTrainer`` with prefix sharing (needs ``trl``; imported only when this submodule is).
"""
