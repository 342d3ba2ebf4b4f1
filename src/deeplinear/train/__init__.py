"""Trainers. Each module (``backprop``, ``es``, ``cmaes``) has the same interface, so callers swap
them freely:

- ``Config``: a dataclass of hyperparameters, JSON-serialisable via ``dataclasses.asdict``, with at
  least ``seed``, ``steps`` (optimisation steps or generations), ``batch_size``, ``eval_every``,
  ``checkpoint_every`` and ``eval_n``;
- ``train(model, data, cfg, run=None, progress=True) -> list[dict]``: trains ``model`` in place and
  returns the metric rows it logged (``step``, ``wall_s``, ``loss``, ``train_acc``, ``test_acc``,
  ...). With ``run.resumed_state`` it continues from that checkpoint and ends bit-identical to an
  uninterrupted run with the same seed.

The modules are not imported here, so one can be used while another is absent or broken.
"""
