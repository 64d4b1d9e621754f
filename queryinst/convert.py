"""QueryInst's official-checkpoint key table (mmdetection layout), registered with
:func:`instseg.convert.register_key_table` as ``queryinst`` (``instseg-convert --model queryinst``).

mmdetection's QueryInst (``configs/queryinst``, mmdetection 3.x; the layout of every key with its
shape: ``tests/refs/queryinst_mmdet_r50_fpn_1x.json``) -> ours (``t`` = stage, ``i`` = index):

==================================================================  ==========================================================
mmdetection                                                         ours
==================================================================  ==========================================================
``backbone.X`` (torchvision names, BN statistics and affine)        ``backbone.bottom_up.body.X`` (FrozenBN buffers with FrozenBN)
``neck.lateral_convs.i.conv.{weight,bias}``                         ``backbone.fpn.inner_blocks.i.0.{weight,bias}``
``neck.fpn_convs.i.conv.{weight,bias}``                             ``backbone.fpn.layer_blocks.i.0.{weight,bias}``
``rpn_head.init_proposal_bboxes.weight``                            ``roi_head.init_proposal_boxes.weight``
``rpn_head.init_proposal_features.weight``                          ``roi_head.init_proposal_features.weight``
``roi_head.bbox_head.t.attention.attn.*``                           ``roi_head.box_heads.t.attention.attn.*``
``roi_head.bbox_head.t.attention_norm.*``                           ``roi_head.box_heads.t.attention.norm.*``
``roi_head.bbox_head.t.instance_interactive_conv.fc_layer.*``       ``roi_head.box_heads.t.dynconv.proj.*``
``roi_head.bbox_head.t.instance_interactive_conv.fc_norm.*``        ``roi_head.box_heads.t.dynconv.proj_norm.*``
``roi_head.bbox_head.t.instance_interactive_conv.*``                ``roi_head.box_heads.t.dynconv.*`` (dynamic_layer, norm_in, norm_out)
``roi_head.bbox_head.t.instance_interactive_conv_norm.*``           ``roi_head.box_heads.t.dynconv_norm.*``
``roi_head.bbox_head.t.ffn.layers.0.0.*``                           ``roi_head.box_heads.t.ffn.0.*``
``roi_head.bbox_head.t.ffn.layers.1.*``                             ``roi_head.box_heads.t.ffn.3.*``
``roi_head.bbox_head.t.{ffn_norm,cls_fcs,reg_fcs,fc_cls,fc_reg}.*``  ``roi_head.box_heads.t.`` + the same name
``roi_head.mask_head.t.instance_interactive_conv.*``                ``roi_head.mask_heads.t.dynconv.*``
``roi_head.mask_head.t.convs.i.conv.weight``                        ``roi_head.mask_heads.t.convs.{3i}.weight``
``roi_head.mask_head.t.convs.i.bn.*``                               ``roi_head.mask_heads.t.convs.{3i+1}.*``
``roi_head.mask_head.t.upsample.*``                                 ``roi_head.mask_heads.t.deconv.*``
``roi_head.mask_head.t.conv_logits.*``                              ``roi_head.mask_heads.t.predictor.*``
``*.num_batches_tracked`` (backbone and mask-head BN)               dropped (our loading does not ask for them)
==================================================================  ==========================================================

The mask-head convs are ``instseg.modeling.layers.conv_norm_relu_stack`` Sequentials (conv, BN,
ReLU per conv: conv ``i`` at ``3i``, its BN at ``3i + 1``); the table covers up to
:data:`MAX_MASK_CONVS` convs and any number of stages. The proposal boxes are normalized
``(cx, cy, w, h)`` in both (mmdetection's ``EmbeddingRPNHead``), the attention is
``nn.MultiheadAttention`` in both (same ``in_proj``/``out_proj`` layout) and DynamicConv's parameter
generator splits its output the same way, so every tensor is copied as it is. The mmdetection R-50
has 53,120 more parameters (the BN affine, trained there, buffers in our FrozenBN); with
``MODEL.RESNETS.NORM BN MODEL.BACKBONE.FREEZE_AT 0`` the counts are equal. Backbone keys are
mapped by the core (:data:`instseg.convert.BACKBONE_KEY_RULES`, torchvision names: identities),
into ``backbone.bottom_up.body.`` (:attr:`instseg.convert.ModelKeyTable.backbone_prefix`).

Not covered: hustvl/QueryInst's own checkpoints (mmdetection 2.x) build the mask-head convs with
``bias=True`` (``FCNMaskHead``), a ``convs.i.conv.bias`` that ours (as mmdetection 3.x) does not
have; those keys are left unmatched (and reported) by the converter.
"""
from instseg.convert import ModelKeyTable, register_key_table

__all__ = ["MAX_MASK_CONVS", "QUERYINST_KEY_TABLE"]

#: Mask-head convs the table maps (the official heads have 4).
MAX_MASK_CONVS = 8

_BOX = r"roi_head\.bbox_head\.(\d+)\."
_MASK = r"roi_head\.mask_head\.(\d+)\."

_PATTERNS = (
    # FPN (mmdetection ConvModule .conv -> torchvision FPN's Conv2dNormActivation index 0)
    (r"neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    # box heads (DIIHead)
    (_BOX + r"attention_norm\.", r"roi_head.box_heads.\1.attention.norm."),
    (_BOX + r"instance_interactive_conv\.fc_layer\.", r"roi_head.box_heads.\1.dynconv.proj."),
    (_BOX + r"instance_interactive_conv\.fc_norm\.", r"roi_head.box_heads.\1.dynconv.proj_norm."),
    (_BOX + r"instance_interactive_conv\.", r"roi_head.box_heads.\1.dynconv."),
    (_BOX + r"instance_interactive_conv_norm\.", r"roi_head.box_heads.\1.dynconv_norm."),
    (_BOX + r"ffn\.layers\.0\.0\.", r"roi_head.box_heads.\1.ffn.0."),
    (_BOX + r"ffn\.layers\.1\.", r"roi_head.box_heads.\1.ffn.3."),
    (_BOX + r"(attention\.|ffn_norm\.|cls_fcs\.|reg_fcs\.|fc_cls\.|fc_reg\.)", r"roi_head.box_heads.\1.\2"),
    # mask heads (DynamicMaskHead)
    (_MASK + r"instance_interactive_conv\.", r"roi_head.mask_heads.\1.dynconv."),
    *(
        pair
        for i in range(MAX_MASK_CONVS)
        for pair in (
            (_MASK + rf"convs\.{i}\.conv\.", rf"roi_head.mask_heads.\1.convs.{3 * i}."),
            (_MASK + rf"convs\.{i}\.bn\.", rf"roi_head.mask_heads.\1.convs.{3 * i + 1}."),
        )
    ),
    (_MASK + r"upsample\.", r"roi_head.mask_heads.\1.deconv."),
    (_MASK + r"conv_logits\.", r"roi_head.mask_heads.\1.predictor."),
)

QUERYINST_KEY_TABLE = register_key_table(
    "queryinst",
    ModelKeyTable(
        prefixes=(
            ("rpn_head.init_proposal_bboxes.", "roi_head.init_proposal_boxes."),
            ("rpn_head.init_proposal_features.", "roi_head.init_proposal_features."),
        ),
        patterns=_PATTERNS,
        backbone_prefix="backbone.bottom_up.body.",
    ),
)
