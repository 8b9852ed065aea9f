"""Features: lake frames enter the backbone (EfficientNet-Lite / ResNet-50, GPU when present);
their dense stride-8/16/32 maps leave in a sharded fp16 feature cache keyed by content and backbone.
"""
