"""Adding classes to a trained classifier without forgetting the old ones (``graft expand``).

The head is widened from K to K+N outputs with the old rows kept as their own block
(``surgery.widen_head``), so in ``frozen`` mode the old classes' logits are bit-identical to the
original model's. The new rows learn against negatives from the old classes (sampled from the
class statistics the original run stored, plus any rehearsal images), and are then calibrated
against the old rows on held-out data. ``fine-tune`` mode then also adapts the backbone, keeping
the old classes with distillation from the original model.
"""
