"""The batch the data yields and the model reads: ``input_ids`` and ``labels`` ``(B, T)``, ``domain`` and
``sample_id`` ``(B,)``; the padding rows that even out the ranks' shares of the eval split carry domain -1 and
:data:`IGNORE_INDEX` labels.

A leaf both sides import, so that neither imports the other for it.
"""

IGNORE_INDEX = -100  # the label of padding: the losses and metrics leave it out
