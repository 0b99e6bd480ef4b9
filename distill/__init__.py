"""Distillation stage: trains students from a store's images and stored teacher logits."""
