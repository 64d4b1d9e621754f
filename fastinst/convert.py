"""FastInst's official-checkpoint key table, registered with :func:`instseg.convert.register_key_table`
as ``fastinst`` (``instseg-convert --model fastinst``).

Ours keep the official layout (``sem_seg_head.pixel_decoder.*`` =
:class:`fastinst.ppm_fpn.PPMFPN`, ``sem_seg_head.predictor.*`` = the dual-path decoder,
including its reference to the criterion, ``sem_seg_head.predictor.criterion.empty_weight``, and
the meta-architecture's own ``criterion.empty_weight``), so the pairs are identities. Both names
of the shared loss buffer are kept: the criterion is one module registered twice, so
``model.state_dict()`` lists it under both names and ``load_state_dict(..., strict=True)`` asks
for both (dropping ``criterion.*`` made every strict load of converted official weights fail
with ``Missing key(s): "criterion.empty_weight"``). Backbone keys are mapped by the core
(:data:`instseg.convert.BACKBONE_KEY_RULES`).
"""
from instseg.convert import ModelKeyTable, register_key_table

__all__ = ["FASTINST_KEY_TABLE"]

FASTINST_KEY_TABLE = register_key_table(
    "fastinst",
    ModelKeyTable(
        prefixes=(
            ("sem_seg_head.pixel_decoder.", "sem_seg_head.pixel_decoder."),
            ("sem_seg_head.predictor.", "sem_seg_head.predictor."),
            ("sem_seg_head.", "sem_seg_head."),
            ("criterion.", "criterion."),
        ),
    ),
)
