"""SparseInst's official-checkpoint key table, registered with :func:`instseg.convert.register_key_table`
as ``sparseinst`` (``instseg-convert --model sparseinst``).

Our modules use the official names (``encoder.*``, ``decoder.*``), so the pairs are identities;
the official ``criterion.*`` loss buffers are dropped. Backbone keys are mapped by the core
(:data:`instseg.convert.BACKBONE_KEY_RULES`).
"""
from instseg.convert import ModelKeyTable, register_key_table

__all__ = ["SPARSEINST_KEY_TABLE"]

SPARSEINST_KEY_TABLE = register_key_table(
    "sparseinst",
    ModelKeyTable(prefixes=(("encoder.", "encoder."), ("decoder.", "decoder.")), drop=("criterion.",)),
)
