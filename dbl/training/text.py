"""Where the LM1B task lived before ``dbl.training.autoregressive``.

Checkpoints keep the class path they were trained with (Lightning's ``_class_path``
hyperparameter, read by every ``--ckpt_path`` and by ``load_from_checkpoint``); this module keeps
those checkpoints loading. New configurations name ``dbl.training.autoregressive``.
"""

from dbl.training.autoregressive import ARDiffusionLMModule, NextTokenLMModule

__all__ = ["ARDiffusionLMModule", "NextTokenLMModule"]
